"""Run docflow's analytics jobs on Amazon EMR: stage them, create the cluster, add the steps.

    python jobs/emr/submit.py stage                  # code, requirements, jars, bootstrap -> S3
    python jobs/emr/submit.py create-cluster         # prints the cluster id
    python jobs/emr/submit.py add-flink-step         # jobs/flink/chunk_counts.py on YARN
    python jobs/emr/submit.py add-archive-step       # jobs/spark/archive.py on YARN
    python jobs/emr/submit.py add-daily-report-step  # jobs/spark/daily_report.py once
    python jobs/emr/submit.py schedule-daily-report  # the same step every day (EventBridge Scheduler)
    python jobs/emr/submit.py teardown               # delete the schedule, terminate the cluster

Every subcommand takes --print-cli: it then calls nothing and prints the AWS CLI commands
that do the same thing. Settings come from DOCFLOW_EMR_* variables (EmrSettings below);
credentials, and an endpoint override, from the usual AWS variables.

The jobs do not run on EMR's own Flink and Spark. EMR 7.x installs Flink 1.20 and Spark
3.5 (Scala 2.12); the jobs are written for Flink 2.2 (pyflink, and a Kafka connector built
for 2.2) and Spark 4 (Scala 2.13 jars). The apache-flink and pyspark packages carry their
complete Flink and Spark distributions, so the bootstrap action installs each job's
requirements into a venv of its own on every node and the steps start those runtimes on
the cluster's YARN (bin/docflow-flink, bin/docflow-spark-submit). See jobs/emr/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Annotated, ClassVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EMR_DIR = Path(__file__).resolve().parent
REPO_ROOT = EMR_DIR.parents[1]
BOOTSTRAP_SCRIPT = EMR_DIR / "bootstrap" / "install-job-runtimes.sh"
LAUNCHERS = (EMR_DIR / "bin" / "docflow-flink", EMR_DIR / "bin" / "docflow-spark-submit")
# What runs where: the Flink job on the Flink runtime, both Spark jobs on the Spark runtime.
JOB_FILES = {"flink": ("chunk_counts.py",), "spark": ("archive.py", "daily_report.py")}
# Modules the jobs import: YARN's containers get them through spark-submit's --py-files.
PY_FILES = {"spark": ("session.py",)}
# Where DOCFLOW_EMR_KAFKA_PROPERTIES is staged in each job's folder (and so lands on every node).
KAFKA_PROPERTIES_NAME = "kafka-client.properties"

# EMR's own tool for running a command as a step (on the primary node, as the hadoop user).
COMMAND_RUNNER = "command-runner.jar"
FLINK_APPLICATION_NAME = "docflow-chunk-counts"
ARCHIVE_APPLICATION_NAME = "docflow-archive"
DAILY_REPORT_APPLICATION_NAME = "docflow-daily-report"
# The long-running jobs may be restarted by YARN this often (within the validity interval
# for Spark); yarn-site's yarn.resourcemanager.am.max-attempts caps both, so it is raised
# to the same number in the cluster configuration.
APPLICATION_ATTEMPTS = 4
POM_NAMESPACE = {"m": "http://maven.apache.org/POM/4.0.0"}


class ConfigurationError(Exception):
    """A setting a subcommand needs is missing or malformed."""


# A comma-separated variable; pydantic-settings would otherwise read a sequence as JSON.
CommaSeparated = Annotated[tuple[str, ...], NoDecode]


class EmrSettings(BaseSettings):
    """Everything site-specific, from DOCFLOW_EMR_* variables (the README's table lists them)."""

    model_config = SettingsConfigDict(env_prefix="DOCFLOW_EMR_", frozen=True, str_strip_whitespace=True)

    bucket: str = ""
    prefix: str = "docflow/emr"
    # Validated when unset too, so that the AWS variables stand in for it.
    region: str = Field("", validate_default=True)
    cluster_name: str = "docflow-analytics"
    release_label: str = "emr-7.13.0"
    applications: CommaSeparated = ("Hadoop", "Flink", "Spark")
    primary_instance_type: str = "m6i.xlarge"
    core_instance_type: str = "m6i.xlarge"
    core_instance_count: int = 2
    subnet_id: str = ""
    key_pair: str = ""
    additional_security_groups: CommaSeparated = ()
    service_role: str = "EMR_DefaultRole"
    instance_profile: str = "EMR_EC2_DefaultRole"
    log_uri: str = ""
    kafka_bootstrap_servers: str = ""
    # A Kafka client.properties for TLS or SASL (`python -m pipeline.broker_security --output FILE`
    # with the cluster's DOCFLOW_KAFKA_* settings): staged beside each job, passed as --kafka-properties.
    kafka_properties: str = ""
    node_python: str = "python3.11"
    flink_parallelism: int = 2
    # Flink's default scheme is file://, so its HDFS path says hdfs:// (the authority comes
    # from the cluster's fs.defaultFS).
    flink_checkpoints: str = "hdfs:///user/hadoop/docflow/checkpoints/chunk-counts"
    # Spark's paths have no scheme: they are on the cluster's default filesystem, HDFS on EMR.
    # hdfs:/// would not do: Spark's streaming checkpoint (Hadoop's FileContext) refuses a
    # URI without an authority, and the namenode's address is not known before the cluster is.
    archive_path: str = "/user/hadoop/docflow/archive"
    archive_checkpoint: str = "/user/hadoop/docflow/checkpoints/archive"
    report_path: str = "/user/hadoop/docflow/reports/daily"
    report_s3_uri: str = ""
    cluster_id: str = ""
    schedule_name: str = "docflow-daily-report"
    schedule_expression: str = "cron(30 1 * * ? *)"
    scheduler_role_arn: str = ""

    # Fixed, not read from the environment: the bootstrap action's layout, where EMR writes
    # the Hadoop configuration on every node, and the cluster's tags.
    node_root: ClassVar[str] = "/opt/docflow"
    hadoop_conf_dir: ClassVar[str] = "/etc/hadoop/conf"
    tags: ClassVar[Mapping[str, str]] = MappingProxyType({"project": "docflow"})

    @field_validator("applications", "additional_security_groups", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("prefix")
    @classmethod
    def _strip_slashes(cls, value: str) -> str:
        return value.strip("/")

    @field_validator("region")
    @classmethod
    def _aws_region(cls, value: str) -> str:
        return value or os.environ.get("AWS_REGION", "") or os.environ.get("AWS_DEFAULT_REGION", "")

    @classmethod
    def from_env(cls) -> EmrSettings:
        """The settings, or a ConfigurationError naming each malformed variable."""
        try:
            return cls()
        except ValidationError as error:
            problems = [
                f"DOCFLOW_EMR_{str(problem['loc'][0]).upper()}={problem['input']!r}: {problem['msg']}"
                for problem in error.errors()
            ]
            raise ConfigurationError("; ".join(problems)) from None

    def require(self, *names: str) -> None:
        missing = [f"DOCFLOW_EMR_{name.upper()}" for name in names if not getattr(self, name)]
        if missing:
            raise ConfigurationError(f"set {', '.join(missing)}")

    @property
    def stage_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def stage_key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    @property
    def cluster_log_uri(self) -> str:
        return self.log_uri or f"{self.stage_uri}/logs/"


@dataclass(frozen=True)
class NodeLayout:
    """Paths on every cluster node, as the bootstrap action lays them out under its --root."""

    root: PurePosixPath

    def job_dir(self, job: str) -> PurePosixPath:
        return self.root / "jobs" / job

    def job_file(self, job: str, name: str) -> PurePosixPath:
        return self.job_dir(job) / name

    def jars_dir(self, job: str) -> PurePosixPath:
        return self.job_dir(job) / "lib"

    def python(self, job: str) -> PurePosixPath:
        return self.root / "venvs" / job / "bin" / "python"

    def site_packages(self, job: str) -> PurePosixPath:
        return self.root / "site-packages" / job

    def launcher(self, name: str) -> PurePosixPath:
        return self.root / "bin" / name

    @property
    def spark_home(self) -> PurePosixPath:
        return self.site_packages("spark") / "pyspark"


# ---------------------------------------------------------------------------- staging


@dataclass(frozen=True)
class StagedFile:
    local: Path
    key: str


def pom_jar_names(pom: Path) -> list[str]:
    """File names maven-dependency-plugin's copy-dependencies gives the pom's direct dependencies."""
    project = ElementTree.parse(pom).getroot()
    properties = {
        element.tag.split("}", 1)[1]: (element.text or "").strip()
        for element in project.findall("m:properties/*", POM_NAMESPACE)
    }

    def resolved(text: str) -> str:
        for name, value in properties.items():
            text = text.replace(f"${{{name}}}", value)
        return text

    names = []
    for dependency in project.findall("m:dependencies/m:dependency", POM_NAMESPACE):
        artifact = dependency.findtext("m:artifactId", default="", namespaces=POM_NAMESPACE).strip()
        version = resolved(dependency.findtext("m:version", default="", namespaces=POM_NAMESPACE).strip())
        if "${" in version or not artifact or not version:
            raise ConfigurationError(f"{pom}: cannot resolve the version of dependency {artifact!r}")
        names.append(f"{artifact}-{version}.jar")
    return names


def job_jars(job_dir: Path, fetch: bool) -> list[Path]:
    """The jars the job's pom names, from Maven Central; fetched with Maven when one is missing."""
    pom = job_dir / "pom.xml"
    names = pom_jar_names(pom)
    missing = [name for name in names if not (job_dir / "lib" / name).is_file()]
    if missing and fetch:
        # The same command the job's pom documents; Maven caches, so this is offline once fetched.
        subprocess.run(["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"], check=True)
        missing = [name for name in names if not (job_dir / "lib" / name).is_file()]
    if missing:
        raise ConfigurationError(
            f"{job_dir / 'lib'} lacks {', '.join(missing)}: run mvn -q -B -f {pom} dependency:copy-dependencies"
        )
    return [job_dir / "lib" / name for name in names]


def _job_sources(job_dir: Path) -> list[Path]:
    return sorted(
        path
        for path in job_dir.rglob("*.py")
        if not any(part.startswith(".") or part in ("__pycache__", "lib") for part in path.relative_to(job_dir).parts)
    )


def staging_plan(settings: EmrSettings, repo_root: Path = REPO_ROOT, fetch_jars: bool = True) -> list[StagedFile]:
    """Every file the cluster needs, and the S3 key it goes to."""
    files = [StagedFile(BOOTSTRAP_SCRIPT, settings.stage_key(f"bootstrap/{BOOTSTRAP_SCRIPT.name}"))]
    files += [StagedFile(launcher, settings.stage_key(f"bin/{launcher.name}")) for launcher in LAUNCHERS]
    for job, entry_points in JOB_FILES.items():
        job_dir = repo_root / "jobs" / job
        needed = (*entry_points, *PY_FILES.get(job, ()), "requirements.txt")
        missing = [name for name in needed if not (job_dir / name).is_file()]
        if missing:
            raise ConfigurationError(f"{job_dir} lacks {', '.join(missing)}")
        for path in [*_job_sources(job_dir), job_dir / "requirements.txt", *job_jars(job_dir, fetch_jars)]:
            relative = path.relative_to(job_dir).as_posix()
            files.append(StagedFile(path, settings.stage_key(f"jobs/{job}/{relative}")))
        if settings.kafka_properties:
            properties = Path(settings.kafka_properties)
            if not properties.is_file():
                raise ConfigurationError(f"DOCFLOW_EMR_KAFKA_PROPERTIES={properties}: no such file")
            # It may hold a SASL password: the stage bucket's readers can read it (AWS_MSK_IAM holds none).
            files.append(StagedFile(properties, settings.stage_key(f"jobs/{job}/{KAFKA_PROPERTIES_NAME}")))
    return files


def kafka_properties_args(settings: EmrSettings, layout: NodeLayout, job: str) -> list:
    """The job's --kafka-properties: the file `stage` put beside it on every node, if one is configured.

    A file and not the properties as arguments: a step's arguments are shown to anyone who may
    describe it (console, DescribeStep, CloudTrail), and sasl.jaas.config can hold a password."""
    if not settings.kafka_properties:
        return []
    return ["--kafka-properties", layout.job_dir(job) / KAFKA_PROPERTIES_NAME]


# ----------------------------------------------------------------- cluster and steps


def bootstrap_action(settings: EmrSettings) -> dict:
    return {
        "Name": "docflow job runtimes",
        "ScriptBootstrapAction": {
            "Path": f"s3://{settings.bucket}/{settings.stage_key(f'bootstrap/{BOOTSTRAP_SCRIPT.name}')}",
            "Args": ["--stage-uri", settings.stage_uri, "--root", settings.node_root, "--python", settings.node_python],
        },
    }


def cluster_configurations() -> list[dict]:
    """EMR classifications. Only YARN's matter: the jobs bring their own Flink and Spark, so
    EMR's flink-conf and spark-defaults (read by EMR's Flink 1.20 and Spark 3.5) never reach
    them; their settings are in the steps instead."""
    return [
        {
            "Classification": "capacity-scheduler",
            "Properties": {
                # Every job's driver is a YARN application master: the Flink JobManager (1.6 GB)
                # and the archive's and the report's Spark drivers (1.4 GB each) run at once.
                # At Hadoop's default share (0.1) the third waits in ACCEPTED until another ends,
                # which a streaming job never does (seen on a YARN mini cluster).
                "yarn.scheduler.capacity.maximum-am-resource-percent": "0.5"
            },
        },
        {
            "Classification": "yarn-site",
            "Properties": {
                # Lets YARN restart the Flink JobManager and the archive's driver this often.
                "yarn.resourcemanager.am.max-attempts": str(APPLICATION_ATTEMPTS),
                # Flink TaskManagers and Spark executors start Python processes beside the JVM;
                # their virtual memory is no measure of what they use.
                "yarn.nodemanager.vmem-check-enabled": "false",
            },
        },
    ]


def run_job_flow_request(settings: EmrSettings) -> dict:
    instances: dict = {
        "InstanceGroups": [
            {
                "Name": "Primary",
                "InstanceRole": "MASTER",
                "InstanceType": settings.primary_instance_type,
                "InstanceCount": 1,
            },
            {
                "Name": "Core",
                "InstanceRole": "CORE",
                "InstanceType": settings.core_instance_type,
                "InstanceCount": settings.core_instance_count,
            },
        ],
        # The Flink job and the archive run until stopped: the cluster outlives its steps.
        "KeepJobFlowAliveWhenNoSteps": True,
        "TerminationProtected": False,
    }
    if settings.subnet_id:
        instances["Ec2SubnetId"] = settings.subnet_id
    if settings.key_pair:
        instances["Ec2KeyName"] = settings.key_pair
    if settings.additional_security_groups:
        # Security groups the MSK/Kafka brokers admit, on every node: the Flink TaskManagers and
        # Spark executors that read Kafka may run on any of them.
        instances["AdditionalMasterSecurityGroups"] = list(settings.additional_security_groups)
        instances["AdditionalSlaveSecurityGroups"] = list(settings.additional_security_groups)
    return {
        "Name": settings.cluster_name,
        "ReleaseLabel": settings.release_label,
        "Applications": [{"Name": name} for name in settings.applications],
        "Instances": instances,
        "BootstrapActions": [bootstrap_action(settings)],
        "Configurations": cluster_configurations(),
        "LogUri": settings.cluster_log_uri,
        "ServiceRole": settings.service_role,
        "JobFlowRole": settings.instance_profile,
        "VisibleToAllUsers": True,
        "Tags": [{"Key": key, "Value": value} for key, value in settings.tags.items()],
    }


def _step(name: str, args: list[str], action_on_failure: str = "CONTINUE") -> dict:
    return {
        "Name": name,
        "ActionOnFailure": action_on_failure,
        "HadoopJarStep": {"Jar": COMMAND_RUNNER, "Args": [str(arg) for arg in args]},
    }


def flink_step(settings: EmrSettings, layout: NodeLayout, savepoint: str | None = None) -> dict:
    """chunk_counts.py in Flink's YARN application mode: the JobManager runs the Python
    program on the cluster, so the step ends once YARN has accepted the application.
    With a savepoint (or retained checkpoint) path, the job resumes its windows and offsets."""
    python = layout.python("flink")
    restore = ["-s", savepoint] if savepoint else []
    return _step(
        "docflow flink chunk_counts",
        [
            layout.launcher("docflow-flink"),
            "run",
            "-t",
            "yarn-application",
            f"-Dyarn.application.name={FLINK_APPLICATION_NAME}",
            f"-Dyarn.application-attempts={APPLICATION_ATTEMPTS}",
            # Checkpoints go to HDFS, where every node reaches them; the Kafka source commits its
            # offsets on each one. Set here rather than through the job's --checkpoint-dir, which
            # takes a local folder (see the README); the job's own checkpointing is switched off
            # below so that it does not override these.
            "-Dexecution.checkpointing.interval=30s",
            f"-Dexecution.checkpointing.dir={settings.flink_checkpoints}",
            "-Dexecution.checkpointing.externalized-checkpoint-retention=RETAIN_ON_CANCELLATION",
            # hdfs:/// takes its namenode from fs.defaultFS: the JobManager and TaskManager
            # containers are told where the cluster's Hadoop configuration is rather than
            # relying on YARN passing HADOOP_CONF_DIR on to them.
            f"-Dcontainerized.master.env.HADOOP_CONF_DIR={settings.hadoop_conf_dir}",
            f"-Dcontainerized.taskmanager.env.HADOOP_CONF_DIR={settings.hadoop_conf_dir}",
            *restore,
            "-pyclientexec",
            python,
            "-pyexec",
            python,
            "-py",
            layout.job_file("flink", "chunk_counts.py"),
            "--bootstrap-servers",
            settings.kafka_bootstrap_servers,
            *kafka_properties_args(settings, layout, "flink"),
            "--jars-dir",
            layout.jars_dir("flink"),
            "--parallelism",
            settings.flink_parallelism,
            "--checkpoint-interval-seconds",
            "0",
        ],
    )


def _spark_submit(layout: NodeLayout, application_name: str, extra_conf: dict[str, str], jars: list[str] = ()) -> list:
    conf = {
        # The job's venv on every node: the driver (in YARN's application master) and executors.
        "spark.pyspark.python": str(layout.python("spark")),
        # Spark's own jars are already on every node (in that venv): not uploaded per submit.
        "spark.yarn.jars": f"local:{layout.spark_home}/jars/*",
        **extra_conf,
    }
    args: list = [
        layout.launcher("docflow-spark-submit"),
        "--master",
        "yarn",
        "--deploy-mode",
        "cluster",
        "--name",
        application_name,
    ]
    for key, value in conf.items():
        args += ["--conf", f"{key}={value}"]
    # Files on the primary node, uploaded by spark-submit: a local: URI would not be, and YARN
    # puts only the uploaded .py files in the folder it adds to the containers' PYTHONPATH.
    args += ["--py-files", ",".join(str(layout.job_file("spark", name)) for name in PY_FILES["spark"])]
    if jars:
        # The Kafka source's jars, placed on every node by the bootstrap action.
        args += ["--jars", ",".join(f"local:{layout.jars_dir('spark') / name}" for name in jars)]
    return args


def spark_jar_names(repo_root: Path = REPO_ROOT) -> list[str]:
    return pom_jar_names(repo_root / "jobs" / "spark" / "pom.xml")


def archive_step(settings: EmrSettings, layout: NodeLayout, repo_root: Path = REPO_ROOT) -> dict:
    """archive.py as a streaming application on YARN; the step ends once it is submitted."""
    return _step(
        "docflow spark archive",
        [
            *_spark_submit(
                layout,
                ARCHIVE_APPLICATION_NAME,
                {
                    "spark.yarn.submit.waitAppCompletion": "false",
                    "spark.yarn.maxAppAttempts": str(APPLICATION_ATTEMPTS),
                    # A failure an hour ago does not count against the attempts any more.
                    "spark.yarn.am.attemptFailuresValidityInterval": "1h",
                },
                jars=spark_jar_names(repo_root),
            ),
            layout.job_file("spark", "archive.py"),
            "--bootstrap-servers",
            settings.kafka_bootstrap_servers,
            *kafka_properties_args(settings, layout, "spark"),
            "--output",
            settings.archive_path,
            "--checkpoint",
            settings.archive_checkpoint,
            # The jars come through --jars above: the job adds none of its own.
            "--jars-dir=",
            # Spark's UI on a free port, reachable through YARN's application proxy.
            "--ui-port",
            "0",
        ],
    )


def daily_report_steps(settings: EmrSettings, layout: NodeLayout, report_date: str | None = None) -> list[dict]:
    """daily_report.py for one UTC day (yesterday unless given), waiting for it to finish so the
    step's state is the report's; then, if DOCFLOW_EMR_REPORT_S3_URI is set, a copy to S3."""
    report_args = [
        layout.job_file("spark", "daily_report.py"),
        "--archive",
        settings.archive_path,
        "--output",
        settings.report_path,
    ]
    if report_date:
        report_args += ["--date", report_date]
    steps = [
        _step(
            "docflow spark daily report",
            [
                # It reads the Parquet archive only: no Kafka jars.
                *_spark_submit(layout, DAILY_REPORT_APPLICATION_NAME, {}),
                *report_args,
            ],
        )
    ]
    if settings.report_s3_uri:
        # The jobs' Spark has no S3 filesystem of its own; EMR's Hadoop has (EMRFS): copy the
        # reports there for Athena. -update copies only what is new or changed.
        steps.append(
            _step(
                "docflow copy daily reports to S3",
                ["hadoop", "distcp", "-update", settings.report_path, settings.report_s3_uri],
            )
        )
    return steps


def schedule_request(settings: EmrSettings, cluster_id: str, steps: list[dict]) -> dict:
    """An EventBridge Scheduler schedule whose universal target calls EMR's AddJobFlowSteps."""
    return {
        "Name": settings.schedule_name,
        "ScheduleExpression": settings.schedule_expression,
        "ScheduleExpressionTimezone": "UTC",
        "FlexibleTimeWindow": {"Mode": "OFF"},
        "State": "ENABLED",
        "Description": f"docflow daily report on EMR cluster {cluster_id}",
        "Target": {
            "Arn": "arn:aws:scheduler:::aws-sdk:emr:addJobFlowSteps",
            "RoleArn": settings.scheduler_role_arn,
            "Input": json.dumps({"JobFlowId": cluster_id, "Steps": steps}),
        },
    }


# ------------------------------------------------------------------ AWS CLI equivalents


def _aws(settings: EmrSettings, *args: str) -> str:
    region = ["--region", settings.region] if settings.region else []
    return shlex.join(["aws", *args, *region])


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def cli_stage(settings: EmrSettings, plan: list[StagedFile]) -> list[str]:
    return [_aws(settings, "s3", "cp", str(item.local), f"s3://{settings.bucket}/{item.key}") for item in plan]


def cli_create_cluster(settings: EmrSettings, request: dict) -> list[str]:
    instances = request["Instances"]
    # The CLI's shapes differ from the API's in a few names (InstanceGroupType, Path/Args).
    groups = [
        {
            "Name": group["Name"],
            "InstanceGroupType": group["InstanceRole"],
            "InstanceType": group["InstanceType"],
            "InstanceCount": group["InstanceCount"],
        }
        for group in instances["InstanceGroups"]
    ]
    ec2_attributes = {"InstanceProfile": request["JobFlowRole"]}
    for api_name, cli_name in (
        ("Ec2SubnetId", "SubnetId"),
        ("Ec2KeyName", "KeyName"),
        ("AdditionalMasterSecurityGroups", "AdditionalMasterSecurityGroups"),
        ("AdditionalSlaveSecurityGroups", "AdditionalSlaveSecurityGroups"),
    ):
        if api_name in instances:
            ec2_attributes[cli_name] = instances[api_name]
    bootstrap_actions = [
        {
            "Name": action["Name"],
            "Path": action["ScriptBootstrapAction"]["Path"],
            "Args": action["ScriptBootstrapAction"]["Args"],
        }
        for action in request["BootstrapActions"]
    ]
    return [
        _aws(
            settings,
            "emr",
            "create-cluster",
            "--name",
            request["Name"],
            "--release-label",
            request["ReleaseLabel"],
            "--applications",
            *[f"Name={app['Name']}" for app in request["Applications"]],
            "--instance-groups",
            _compact(groups),
            "--ec2-attributes",
            _compact(ec2_attributes),
            "--service-role",
            request["ServiceRole"],
            "--log-uri",
            request["LogUri"],
            "--bootstrap-actions",
            _compact(bootstrap_actions),
            "--configurations",
            _compact(request["Configurations"]),
            "--tags",
            *[f"{tag['Key']}={tag['Value']}" for tag in request["Tags"]],
            "--no-termination-protected",
            "--query",
            "ClusterId",
            "--output",
            "text",
        )
    ]


def cli_add_steps(settings: EmrSettings, cluster_id: str, steps: list[dict]) -> list[str]:
    cli_steps = [
        {
            "Type": "CUSTOM_JAR",
            "Name": step["Name"],
            "ActionOnFailure": step["ActionOnFailure"],
            "Jar": step["HadoopJarStep"]["Jar"],
            "Args": step["HadoopJarStep"]["Args"],
        }
        for step in steps
    ]
    return [_aws(settings, "emr", "add-steps", "--cluster-id", cluster_id, "--steps", _compact(cli_steps))]


def cli_create_schedule(settings: EmrSettings, request: dict) -> list[str]:
    return [
        _aws(
            settings,
            "scheduler",
            "create-schedule",
            "--name",
            request["Name"],
            "--schedule-expression",
            request["ScheduleExpression"],
            "--schedule-expression-timezone",
            request["ScheduleExpressionTimezone"],
            "--flexible-time-window",
            _compact(request["FlexibleTimeWindow"]),
            "--state",
            request["State"],
            "--description",
            request["Description"],
            "--target",
            _compact(request["Target"]),
        )
    ]


def cli_teardown(settings: EmrSettings, cluster_id: str) -> list[str]:
    return [
        _aws(settings, "scheduler", "delete-schedule", "--name", settings.schedule_name),
        _aws(settings, "emr", "terminate-clusters", "--cluster-ids", cluster_id),
    ]


# ------------------------------------------------------------------------ AWS calls


def _client(settings: EmrSettings, service: str):
    import boto3  # only where AWS is called: --print-cli works without boto3 installed

    return boto3.client(service, region_name=settings.region or None)


def upload(settings: EmrSettings, plan: list[StagedFile]) -> None:
    s3 = _client(settings, "s3")
    for item in plan:
        s3.upload_file(str(item.local), settings.bucket, item.key)
        print(f"s3://{settings.bucket}/{item.key}")


def add_steps(settings: EmrSettings, cluster_id: str, steps: list[dict]) -> None:
    response = _client(settings, "emr").add_job_flow_steps(JobFlowId=cluster_id, Steps=steps)
    for step_id in response["StepIds"]:
        print(step_id)


def put_schedule(settings: EmrSettings, request: dict) -> None:
    scheduler = _client(settings, "scheduler")
    try:
        response = scheduler.create_schedule(**request)
    except scheduler.exceptions.ConflictException:
        # Pointing an existing schedule at a new cluster: same name, new target.
        response = scheduler.update_schedule(**request)
    print(response["ScheduleArn"])


def teardown(settings: EmrSettings, cluster_id: str) -> None:
    scheduler = _client(settings, "scheduler")
    try:
        scheduler.delete_schedule(Name=settings.schedule_name)
        print(f"deleted schedule {settings.schedule_name}")
    except scheduler.exceptions.ResourceNotFoundException:
        print(f"no schedule {settings.schedule_name}")
    _client(settings, "emr").terminate_job_flows(JobFlowIds=[cluster_id])
    print(f"terminating {cluster_id}")


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="submit.py",
        description=__doc__.split("\n\n")[0],
        epilog="Settings: DOCFLOW_EMR_* environment variables (jobs/emr/README.md).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--print-cli", action="store_true", help="call nothing: print the equivalent AWS CLI commands instead"
    )
    with_cluster = argparse.ArgumentParser(add_help=False, parents=[common])
    with_cluster.add_argument("--cluster-id", help="the EMR cluster (default: DOCFLOW_EMR_CLUSTER_ID)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "stage", parents=[common], help="upload the bootstrap action, launchers, job code, requirements and jars to S3"
    )
    commands.add_parser(
        "create-cluster",
        parents=[common],
        help="create the cluster (Hadoop, Flink, Spark; the bootstrap action) and print its id",
    )
    flink = commands.add_parser(
        "add-flink-step", parents=[with_cluster], help="start jobs/flink/chunk_counts.py on YARN"
    )
    flink.add_argument(
        "--from-savepoint", metavar="PATH", help="resume from this savepoint or retained checkpoint (Flink's -s)"
    )
    commands.add_parser("add-archive-step", parents=[with_cluster], help="start jobs/spark/archive.py on YARN")
    daily = commands.add_parser(
        "add-daily-report-step", parents=[with_cluster], help="run jobs/spark/daily_report.py once"
    )
    daily.add_argument("--date", help="UTC day YYYY-MM-DD (default: the job's own, yesterday)")
    commands.add_parser(
        "schedule-daily-report",
        parents=[with_cluster],
        help="add the daily report step every day (EventBridge Scheduler)",
    )
    commands.add_parser("teardown", parents=[with_cluster], help="delete the schedule and terminate the cluster")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, settings: EmrSettings) -> list[str]:
    """Does what the subcommand says, or returns its AWS CLI commands with --print-cli."""
    layout = NodeLayout(PurePosixPath(settings.node_root))
    cluster_id = getattr(args, "cluster_id", None) or settings.cluster_id
    if args.command not in ("stage", "create-cluster") and not cluster_id:
        raise ConfigurationError("set DOCFLOW_EMR_CLUSTER_ID or pass --cluster-id")

    if args.command == "stage":
        settings.require("bucket")
        plan = staging_plan(settings)
        if args.print_cli:
            return cli_stage(settings, plan)
        upload(settings, plan)
    elif args.command == "create-cluster":
        settings.require("bucket")
        request = run_job_flow_request(settings)
        if args.print_cli:
            return cli_create_cluster(settings, request)
        print(_client(settings, "emr").run_job_flow(**request)["JobFlowId"])
    elif args.command in ("add-flink-step", "add-archive-step", "add-daily-report-step"):
        if args.command == "add-daily-report-step":
            steps = daily_report_steps(settings, layout, args.date)
        elif args.command == "add-flink-step":
            settings.require("kafka_bootstrap_servers")
            steps = [flink_step(settings, layout, args.from_savepoint)]
        else:
            settings.require("kafka_bootstrap_servers")
            steps = [archive_step(settings, layout)]
        if args.print_cli:
            return cli_add_steps(settings, cluster_id, steps)
        add_steps(settings, cluster_id, steps)
    elif args.command == "schedule-daily-report":
        settings.require("scheduler_role_arn")
        request = schedule_request(settings, cluster_id, daily_report_steps(settings, layout))
        if args.print_cli:
            return cli_create_schedule(settings, request)
        put_schedule(settings, request)
    elif args.command == "teardown":
        if args.print_cli:
            return cli_teardown(settings, cluster_id)
        teardown(settings, cluster_id)
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        commands = run(args, EmrSettings.from_env())
    except ConfigurationError as error:
        print(f"submit.py {args.command}: {error}", file=sys.stderr)
        return 2
    for command in commands:
        print(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
