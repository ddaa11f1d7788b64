"""jobs/emr/submit.py against moto's server on loopback (S3, EMR and EventBridge Scheduler).

What EMR itself would do with the cluster cannot run here; what can be checked is checked
against the real pieces:

- `stage` uploads exactly the files the cluster needs, byte for byte;
- `create-cluster` and the `add-*-step` subcommands record the applications, the bootstrap
  action, the configuration and the step commands that were meant;
- the bootstrap action, fetched from where the cluster would fetch it and run by bash with
  the arguments moto recorded, lays out every path those step commands name (only its pip
  install is replaced: it needs PyPI); the paths that pip creates are checked against the
  jobs' own venvs, which `make jobs` installs from the same requirements files;
- each job's own argument parser accepts the arguments its step passes;
- the `--print-cli` commands, run through the real AWS CLI, record the same cluster, steps
  and schedule as the boto3 calls.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path, PurePosixPath

import boto3
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBMIT = REPO_ROOT / "jobs" / "emr" / "submit.py"
BOOTSTRAP = REPO_ROOT / "jobs" / "emr" / "bootstrap" / "install-job-runtimes.sh"
NODE_ROOT = "/opt/docflow"
KAFKA = "b-1.docflow-msk.example:9092,b-2.docflow-msk.example:9092"
SCHEDULER_ROLE = "arn:aws:iam::123456789012:role/docflow-scheduler"
# The aws executable of awscli from the test extra, beside this interpreter.
AWS_CLI_DIR = str(Path(sys.executable).parent)


def job_python(job: str) -> Path:
    python = REPO_ROOT / "jobs" / job / ".venv" / "bin" / "python"
    assert python.exists(), f"jobs/{job}/.venv is missing: `make jobs` builds it"
    return python


@pytest.fixture
def emr_env(s3_endpoint, tmp_path) -> dict[str, str]:
    """The environment submit.py and the AWS CLI run with: moto's endpoint, a fresh bucket."""
    bucket = f"docflow-emr-{uuid.uuid4().hex[:12]}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("DOCFLOW_EMR_")}
    env.update(
        {
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PATH": AWS_CLI_DIR + os.pathsep + env.get("PATH", ""),
            "DOCFLOW_EMR_BUCKET": bucket,
            "DOCFLOW_EMR_PREFIX": "releases/test",
            "DOCFLOW_EMR_REGION": "us-east-1",
            "DOCFLOW_EMR_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
            "DOCFLOW_EMR_SUBNET_ID": "subnet-0a1b2c3d4e5f60718",
            "DOCFLOW_EMR_KEY_PAIR": "docflow-ops",
            "DOCFLOW_EMR_ADDITIONAL_SECURITY_GROUPS": "sg-0aaaaaaaaaaaaaaaa,sg-0bbbbbbbbbbbbbbbb",
            "DOCFLOW_EMR_REPORT_S3_URI": f"s3://{bucket}/reports/daily",
            "DOCFLOW_EMR_SCHEDULER_ROLE_ARN": SCHEDULER_ROLE,
        }
    )
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return env


def clients(env: dict[str, str]):
    session = boto3.session.Session(region_name="us-east-1")
    endpoint = env["AWS_ENDPOINT_URL"]
    return (
        session.client("s3", endpoint_url=endpoint),
        session.client("emr", endpoint_url=endpoint),
        session.client("scheduler", endpoint_url=endpoint),
    )


def submit(env: dict[str, str], *args: str) -> list[str]:
    result = subprocess.run([sys.executable, str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def run_aws_cli(env: dict[str, str], commands: list[str]) -> list[str]:
    """Runs printed commands as a shell would; returns each command's stdout."""
    outputs = []
    for command in commands:
        assert command.startswith("aws "), command
        result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        outputs.append(result.stdout.strip())
    return outputs


def staged_objects(s3, bucket: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="releases/test/")
    return {
        item["Key"]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed.get("Contents", [])
    }


def expected_stage() -> dict[str, Path]:
    """Key -> local file: what the cluster needs, listed independently of submit.py."""
    emr = REPO_ROOT / "jobs" / "emr"
    expected = {
        "releases/test/bootstrap/install-job-runtimes.sh": emr / "bootstrap" / "install-job-runtimes.sh",
        "releases/test/bin/docflow-flink": emr / "bin" / "docflow-flink",
        "releases/test/bin/docflow-spark-submit": emr / "bin" / "docflow-spark-submit",
    }
    for job, names in {"flink": ["chunk_counts.py"], "spark": ["archive.py", "daily_report.py", "session.py"]}.items():
        job_dir = REPO_ROOT / "jobs" / job
        for path in [
            *(job_dir / name for name in names),
            job_dir / "requirements.txt",
            *sorted((job_dir / "lib").glob("*.jar")),
        ]:
            expected[f"releases/test/jobs/{job}/{path.relative_to(job_dir).as_posix()}"] = path
    return expected


def pinned_version(job: str, package: str) -> str:
    requirements = (REPO_ROOT / "jobs" / job / "requirements.txt").read_text()
    (version,) = re.findall(rf"^{re.escape(package)}==(\S+)", requirements, flags=re.MULTILINE)
    return version


def cluster_record(emr, cluster_id: str) -> dict:
    """What moto recorded of a cluster, without ids and timestamps."""
    cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
    attributes = cluster["Ec2InstanceAttributes"]
    return {
        "Name": cluster["Name"],
        "ReleaseLabel": cluster["ReleaseLabel"],
        "Applications": sorted(app["Name"] for app in cluster["Applications"]),
        "Configurations": cluster.get("Configurations", []),
        "LogUri": cluster["LogUri"],
        "ServiceRole": cluster["ServiceRole"],
        "AutoTerminate": cluster["AutoTerminate"],
        "TerminationProtected": cluster["TerminationProtected"],
        "Tags": sorted((tag["Key"], tag["Value"]) for tag in cluster["Tags"]),
        "Ec2": {
            key: attributes.get(key)
            for key in (
                "Ec2KeyName",
                "Ec2SubnetId",
                "IamInstanceProfile",
                "AdditionalMasterSecurityGroups",
                "AdditionalSlaveSecurityGroups",
            )
        },
        "InstanceGroups": sorted(
            (group["InstanceGroupType"], group["InstanceType"], group["RequestedInstanceCount"])
            for group in emr.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]
        ),
        "BootstrapActions": [
            {"Name": action["Name"], "ScriptPath": action["ScriptPath"], "Args": action["Args"]}
            for action in emr.list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
        ],
        "Steps": steps_record(emr, cluster_id),
    }


def steps_record(emr, cluster_id: str) -> list[dict]:
    """Steps in the order they were added (list_steps lists the newest first)."""
    return [
        {
            "Name": step["Name"],
            "ActionOnFailure": step["ActionOnFailure"],
            "Jar": step["Config"]["Jar"],
            "Args": step["Config"]["Args"],
        }
        for step in reversed(emr.list_steps(ClusterId=cluster_id)["Steps"])
    ]


def value_after(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


def spark_conf(args: list[str]) -> dict[str, str]:
    return dict(args[index + 1].split("=", 1) for index, arg in enumerate(args) if arg == "--conf")


def node_paths(args: list[str]) -> list[str]:
    """Every path under the node root that a step's arguments name (in -D/--conf values,
    comma lists and local: URIs too)."""
    found = []
    for arg in args:
        for piece in re.split(r"[,=]", arg):
            piece = piece.removeprefix("local:")
            if piece.startswith(NODE_ROOT + "/"):
                found.append(piece)
    return found


def deploy_with_boto3(env: dict[str, str]) -> str:
    submit(env, "stage")
    (cluster_id,) = submit(env, "create-cluster")
    env = {**env, "DOCFLOW_EMR_CLUSTER_ID": cluster_id}
    for command in ("add-flink-step", "add-archive-step"):
        assert len(submit(env, command)) == 1
    assert len(submit(env, "add-daily-report-step", "--date", "2024-03-15")) == 2  # the report and its copy
    return cluster_id


def test_stage_and_cluster_record_what_the_jobs_need(emr_env):
    s3, emr, _ = clients(emr_env)
    cluster_id = deploy_with_boto3(emr_env)
    bucket = emr_env["DOCFLOW_EMR_BUCKET"]

    staged = staged_objects(s3, bucket)
    expected = expected_stage()
    assert sorted(staged) == sorted(expected)
    for key, local in expected.items():
        assert staged[key] == local.read_bytes(), key
    # The staged connectors are built for the runtimes the staged requirements pin.
    flink_version = pinned_version("flink", "apache-flink")
    flink_line = ".".join(flink_version.split(".")[:2])
    assert any(
        re.fullmatch(rf"releases/test/jobs/flink/lib/flink-sql-connector-kafka-[\d.]+-{flink_line}\.jar", key)
        for key in staged
    ), sorted(staged)
    spark_version = pinned_version("spark", "pyspark")
    assert {
        f"releases/test/jobs/spark/lib/spark-sql-kafka-0-10_2.13-{spark_version}.jar",
        f"releases/test/jobs/spark/lib/spark-token-provider-kafka-0-10_2.13-{spark_version}.jar",
    } <= set(staged)

    record = cluster_record(emr, cluster_id)
    assert record["ReleaseLabel"] == "emr-7.13.0"
    assert record["Applications"] == ["Flink", "Hadoop", "Spark"]
    assert record["LogUri"] == f"s3://{bucket}/releases/test/logs/"
    assert record["AutoTerminate"] is False
    assert record["InstanceGroups"] == [("CORE", "m6i.xlarge", 2), ("MASTER", "m6i.xlarge", 1)]
    assert record["Ec2"] == {
        "Ec2KeyName": "docflow-ops",
        "Ec2SubnetId": "subnet-0a1b2c3d4e5f60718",
        "IamInstanceProfile": "EMR_EC2_DefaultRole",
        "AdditionalMasterSecurityGroups": ["sg-0aaaaaaaaaaaaaaaa", "sg-0bbbbbbbbbbbbbbbb"],
        "AdditionalSlaveSecurityGroups": ["sg-0aaaaaaaaaaaaaaaa", "sg-0bbbbbbbbbbbbbbbb"],
    }
    configurations = {c["Classification"]: c["Properties"] for c in record["Configurations"]}
    assert configurations["yarn-site"]["yarn.resourcemanager.am.max-attempts"] == "4"
    # Three drivers are application masters at once: Hadoop's default share (0.1) admits two.
    assert float(configurations["capacity-scheduler"]["yarn.scheduler.capacity.maximum-am-resource-percent"]) >= 0.5

    (bootstrap,) = record["BootstrapActions"]
    # The script the cluster runs is the staged copy of the repository's.
    script_key = bootstrap["ScriptPath"].removeprefix(f"s3://{bucket}/")
    assert staged[script_key] == BOOTSTRAP.read_bytes()
    assert bootstrap["Args"] == [
        "--stage-uri",
        f"s3://{bucket}/releases/test",
        "--root",
        NODE_ROOT,
        "--python",
        "python3.11",
    ]

    flink, archive, report, copy = record["Steps"]
    for step in (flink, archive, report, copy):
        assert step["Jar"] == "command-runner.jar" and step["ActionOnFailure"] == "CONTINUE"

    flink_args = flink["Args"]
    assert flink_args[:4] == [f"{NODE_ROOT}/bin/docflow-flink", "run", "-t", "yarn-application"]
    assert value_after(flink_args, "-py") == f"{NODE_ROOT}/jobs/flink/chunk_counts.py"
    assert (
        value_after(flink_args, "-pyclientexec")
        == value_after(flink_args, "-pyexec")
        == (f"{NODE_ROOT}/venvs/flink/bin/python")
    )
    assert "-Dexecution.checkpointing.dir=hdfs:///user/hadoop/docflow/checkpoints/chunk-counts" in flink_args
    # hdfs:/// needs the Hadoop configuration inside the containers (it failed without, on YARN).
    for process in ("master", "taskmanager"):
        assert f"-Dcontainerized.{process}.env.HADOOP_CONF_DIR=/etc/hadoop/conf" in flink_args
    assert value_after(flink_args, "--bootstrap-servers") == KAFKA
    assert value_after(flink_args, "--jars-dir") == f"{NODE_ROOT}/jobs/flink/lib"
    # The job's own checkpointing is off so that the -D settings above (HDFS) apply.
    assert value_after(flink_args, "--checkpoint-interval-seconds") == "0"

    archive_args = archive["Args"]
    assert archive_args[:5] == [f"{NODE_ROOT}/bin/docflow-spark-submit", "--master", "yarn", "--deploy-mode", "cluster"]
    conf = spark_conf(archive_args)
    assert conf["spark.pyspark.python"] == f"{NODE_ROOT}/venvs/spark/bin/python"
    assert conf["spark.yarn.jars"] == f"local:{NODE_ROOT}/site-packages/spark/pyspark/jars/*"
    # A streaming job: the step must not wait for it, or it would hold every later step.
    assert conf["spark.yarn.submit.waitAppCompletion"] == "false"
    spark_jars = sorted(key.rsplit("/", 1)[1] for key in staged if key.startswith("releases/test/jobs/spark/lib/"))
    assert (
        sorted(PurePosixPath(jar.removeprefix("local:")).name for jar in value_after(archive_args, "--jars").split(","))
        == spark_jars
    )
    assert value_after(archive_args, f"{NODE_ROOT}/jobs/spark/archive.py") == "--bootstrap-servers"
    # The module both Spark jobs import, shipped to YARN's containers, which lack it otherwise.
    assert value_after(archive_args, "--py-files") == f"{NODE_ROOT}/jobs/spark/session.py"
    assert archive_args.index("--py-files") < archive_args.index(f"{NODE_ROOT}/jobs/spark/archive.py")
    assert value_after(archive_args, "--bootstrap-servers") == KAFKA
    assert value_after(archive_args, "--output") == "/user/hadoop/docflow/archive"

    report_args = report["Args"]
    assert "spark.yarn.submit.waitAppCompletion=false" not in report_args  # the step's state is the report's
    assert spark_conf(report_args)["spark.pyspark.python"] == f"{NODE_ROOT}/venvs/spark/bin/python"
    assert value_after(report_args, "--py-files") == f"{NODE_ROOT}/jobs/spark/session.py"
    assert report_args.index("--py-files") < report_args.index(f"{NODE_ROOT}/jobs/spark/daily_report.py")
    assert value_after(report_args, "--archive") == value_after(archive_args, "--output")
    assert value_after(report_args, "--date") == "2024-03-15"
    assert copy["Args"] == [
        "hadoop",
        "distcp",
        "-update",
        value_after(report_args, "--output"),
        f"s3://{bucket}/reports/daily",
    ]


def test_bootstrap_lays_out_every_path_the_steps_name(emr_env, tmp_path):
    s3, emr, _ = clients(emr_env)
    cluster_id = deploy_with_boto3(emr_env)
    record = cluster_record(emr, cluster_id)
    (bootstrap,) = record["BootstrapActions"]

    # The script as the cluster would get it, from its S3 path, with the recorded arguments;
    # only the root (a temporary folder) and the interpreter differ on this machine.
    bucket, key = bootstrap["ScriptPath"].removeprefix("s3://").split("/", 1)
    script = tmp_path / "install-job-runtimes.sh"
    script.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    node_root = tmp_path / "node"
    args = list(bootstrap["Args"])
    args[args.index("--root") + 1] = str(node_root)
    args[args.index("--python") + 1] = sys.executable
    pip_calls = tmp_path / "pip-calls"
    # Everything runs as on a node except pip install, which needs PyPI: it is replaced by a
    # function that notes what it was asked to install where.
    result = subprocess.run(
        # The script is $1, not $0: sourced as $0, its own guard would run main before the override.
        [
            "bash",
            "-c",
            'script=$1; shift; source "$script"; install_requirements() { echo "$1 $2" >> "$PIP_CALLS"; }; main "$@"',
            "bootstrap-test",
            str(script),
            *args,
        ],
        env={**emr_env, "PIP_CALLS": str(pip_calls)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "docflow bootstrap: done" in result.stdout

    assert pip_calls.read_text().splitlines() == [
        f"{node_root}/venvs/{job} {node_root}/jobs/{job}/requirements.txt" for job in ("flink", "spark")
    ]
    for job in ("flink", "spark"):
        assert (node_root / "jobs" / job / "requirements.txt").read_bytes() == (
            REPO_ROOT / "jobs" / job / "requirements.txt"
        ).read_bytes()

    installed_by_pip = []
    for step in record["Steps"]:
        for path in node_paths(step["Args"]):
            local = node_root / PurePosixPath(path).relative_to(NODE_ROOT)
            if PurePosixPath(path).is_relative_to(f"{NODE_ROOT}/site-packages"):
                installed_by_pip.append(path)
                continue
            if "*" in local.name:
                assert list(local.parent.glob(local.name)), path
            else:
                assert local.exists(), f"{step['Name']} names {path}, which the bootstrap does not create"
            if path.startswith(f"{NODE_ROOT}/bin/") or path.endswith("/bin/python"):
                assert os.access(local, os.X_OK), path
    assert installed_by_pip == [f"{NODE_ROOT}/site-packages/spark/pyspark/jars/*"] * 2
    # The link the launchers and spark.yarn.jars go through points into the job's venv.
    for job in ("flink", "spark"):
        link = node_root / "site-packages" / job
        assert link.is_symlink() and link.resolve().is_relative_to((node_root / "venvs" / job).resolve())


def job_package(job: str, package: str) -> Path:
    purelib = subprocess.run(
        [str(job_python(job)), "-c", 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(purelib) / package


def test_pip_installed_runtimes_have_what_the_launchers_use():
    """The launchers and spark.yarn.jars name paths inside the apache-flink and pyspark
    packages; the jobs' venvs hold the very versions their requirements files pin."""
    flink_home = job_package("flink", "pyflink")
    for relative in ("bin/flink", "bin/config.sh", "conf/config.yaml"):
        assert (flink_home / relative).is_file(), flink_home / relative
    (flink_dist,) = flink_home.glob("lib/flink-dist-*.jar")
    with zipfile.ZipFile(flink_dist) as jar:  # Flink's YARN application mode is in the distribution
        assert "org/apache/flink/yarn/entrypoint/YarnApplicationClusterEntryPoint.class" in jar.namelist()

    spark_home = job_package("spark", "pyspark")
    for relative in ("bin/spark-submit", "python/lib/pyspark.zip"):
        assert (spark_home / relative).is_file(), spark_home / relative
    assert list(spark_home.glob("jars/spark-yarn_2.13-*.jar"))  # and Spark's YARN backend


def test_each_job_accepts_the_arguments_of_its_step(emr_env):
    _, emr, _ = clients(emr_env)
    cluster_id = deploy_with_boto3(emr_env)
    flink, archive, report, _copy = steps_record(emr, cluster_id)
    parse = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); module = __import__(sys.argv[2]); "
        "print(json.dumps(vars(module.parse_args(sys.argv[3:])), default=str))"
    )
    for job, step, script in (
        ("flink", flink, "chunk_counts.py"),
        ("spark", archive, "archive.py"),
        ("spark", report, "daily_report.py"),
    ):
        script_path = f"{NODE_ROOT}/jobs/{job}/{script}"
        position = step["Args"].index(script_path)
        job_args = step["Args"][position + 1 :]
        result = subprocess.run(
            [str(job_python(job)), "-c", parse, str(REPO_ROOT / "jobs" / job), script.removesuffix(".py"), *job_args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{script} refuses {job_args}: {result.stderr}"
        parsed = json.loads(result.stdout)
        if script == "chunk_counts.py":
            assert parsed["bootstrap_servers"] == KAFKA and parsed["parallelism"] == 2
            assert parsed["checkpoint_interval_seconds"] == 0
        elif script == "archive.py":
            assert parsed["jars_dir"] == "" and parsed["ui_port"] == 0
            assert parsed["checkpoint"] == "/user/hadoop/docflow/checkpoints/archive"
        else:
            assert parsed["date"] == "2024-03-15"


def test_print_cli_does_what_boto3_does(emr_env):
    s3, emr, scheduler = clients(emr_env)
    bucket = emr_env["DOCFLOW_EMR_BUCKET"]
    boto3_cluster = deploy_with_boto3(emr_env)
    boto3_env = {**emr_env, "DOCFLOW_EMR_CLUSTER_ID": boto3_cluster}
    submit(boto3_env, "schedule-daily-report")
    boto3_staged = staged_objects(s3, bucket)

    # The same again through the printed AWS CLI commands, into a second bucket.
    cli_env = {**emr_env, "DOCFLOW_EMR_SCHEDULE_NAME": "docflow-daily-report-cli"}
    for key in list(boto3_staged):
        s3.delete_object(Bucket=bucket, Key=key)
    run_aws_cli(cli_env, submit(cli_env, "stage", "--print-cli"))
    assert staged_objects(s3, bucket) == boto3_staged
    (cli_cluster,) = run_aws_cli(cli_env, submit(cli_env, "create-cluster", "--print-cli"))
    cli_env["DOCFLOW_EMR_CLUSTER_ID"] = cli_cluster
    for command in (["add-flink-step"], ["add-archive-step"], ["add-daily-report-step", "--date", "2024-03-15"]):
        run_aws_cli(cli_env, submit(cli_env, *command, "--print-cli"))
    run_aws_cli(cli_env, submit(cli_env, "schedule-daily-report", "--print-cli"))

    assert cluster_record(emr, cli_cluster) == cluster_record(emr, boto3_cluster)
    schedules = {
        name: scheduler.get_schedule(Name=name) for name in ("docflow-daily-report", "docflow-daily-report-cli")
    }
    for schedule in schedules.values():
        assert schedule["ScheduleExpression"] == "cron(30 1 * * ? *)"
        assert schedule["ScheduleExpressionTimezone"] == "UTC"
        assert schedule["Target"]["Arn"] == "arn:aws:scheduler:::aws-sdk:emr:addJobFlowSteps"
        assert schedule["Target"]["RoleArn"] == SCHEDULER_ROLE
    # The scheduled input is AddJobFlowSteps for the daily report as add-daily-report-step adds
    # it, without --date: the job then reports on the day before the one it runs on.
    undated = [
        {
            "Name": step["Name"],
            "ActionOnFailure": step["ActionOnFailure"],
            "HadoopJarStep": {
                "Jar": step["Jar"],
                "Args": [
                    arg
                    for index, arg in enumerate(step["Args"])
                    if arg != "--date" and step["Args"][index - 1] != "--date"
                ],
            },
        }
        for step in steps_record(emr, boto3_cluster)[2:]
    ]
    assert json.loads(schedules["docflow-daily-report"]["Target"]["Input"]) == {
        "JobFlowId": boto3_cluster,
        "Steps": undated,
    }
    assert json.loads(schedules["docflow-daily-report-cli"]["Target"]["Input"]) == {
        "JobFlowId": cli_cluster,
        "Steps": undated,
    }

    run_aws_cli(cli_env, submit(cli_env, "teardown", "--print-cli"))
    assert submit(boto3_env, "teardown")[-1] == f"terminating {boto3_cluster}"
    for cluster_id, name in ((cli_cluster, "docflow-daily-report-cli"), (boto3_cluster, "docflow-daily-report")):
        assert emr.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"].startswith("TERMINAT")
        with pytest.raises(scheduler.exceptions.ResourceNotFoundException):
            scheduler.get_schedule(Name=name)


def test_missing_settings_are_named(emr_env):
    env = {name: value for name, value in emr_env.items() if name != "DOCFLOW_EMR_KAFKA_BOOTSTRAP_SERVERS"}
    result = subprocess.run(
        [sys.executable, str(SUBMIT), "add-flink-step", "--cluster-id", "j-1", "--print-cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "DOCFLOW_EMR_KAFKA_BOOTSTRAP_SERVERS" in result.stderr
    # Printed commands quote what the shell would split.
    savepoint = "hdfs:///user/hadoop/docflow/savepoints/savepoint-4a3b2c-1e2f3a4b5c6d"
    (command,) = submit(emr_env, "add-flink-step", "--cluster-id", "j-1", "--from-savepoint", savepoint, "--print-cli")
    words = shlex.split(command)
    assert words[:5] == ["aws", "emr", "add-steps", "--cluster-id", "j-1"]
    (step,) = json.loads(value_after(words, "--steps"))
    # A Flink option: before -py, after which everything is the job's own arguments.
    assert value_after(step["Args"], "-s") == savepoint
    assert step["Args"].index("-s") < step["Args"].index("-py")
