"""Kafka TLS and SASL for every client docflow makes, from the DOCFLOW_KAFKA_* settings.

Why a module of its own: docflow reaches Kafka through aiokafka (admin, probes, readers),
through Faust (the workers) and through the JVM (the Flink and Spark jobs), and each wants
security in its own shape. Deriving all three here from one set of settings means a
production broker's TLS and SASL cannot be configured for one client and forgotten in
another (docs/operations.md). The jobs cannot import docflow (their own venvs, their own
nodes on EMR), so they take the JVM properties as a file:
``python -m pipeline.broker_security --output FILE`` writes them as a Kafka
client.properties, the jobs' ``--kafka-properties``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from pipeline.errors import KafkaSecurityError

# The settings this module reads: what a process needs to reach the same brokers as this one.
SETTINGS_FIELDS = (
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "kafka_aws_region",
)
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
MSK_IAM = "AWS_MSK_IAM"
LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
# The JVM side of MSK IAM: classes of the aws-msk-iam-auth jar, which must be on the job's classpath.
MSK_IAM_LOGIN_MODULE = "software.amazon.msk.auth.iam.IAMLoginModule"
MSK_IAM_CALLBACK_HANDLER = "software.amazon.msk.auth.iam.IAMClientCallbackHandler"
# A signed MSK token is valid for 15 minutes; a connection made later asks for a new one.
MSK_TOKEN_REUSE_SECONDS = 600


def _var(settings, field: str) -> str:
    """The environment variable a setting is read from, for messages."""
    return f"{settings.model_config.get('env_prefix', '')}{field.upper()}"


def _check(settings) -> None:
    protocol = settings.kafka_security_protocol
    mechanism = settings.kafka_sasl_mechanism
    tls_files = [f for f in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile") if getattr(settings, f)]
    if tls_files and protocol not in TLS_PROTOCOLS:
        names = ", ".join(_var(settings, f) for f in tls_files)
        raise KafkaSecurityError(f"{names} set, but {_var(settings, 'kafka_security_protocol')}={protocol} uses no TLS")
    if settings.kafka_ssl_keyfile and not settings.kafka_ssl_certfile:
        raise KafkaSecurityError(f"{_var(settings, 'kafka_ssl_keyfile')} needs {_var(settings, 'kafka_ssl_certfile')}")
    if protocol not in SASL_PROTOCOLS:
        return
    if mechanism == MSK_IAM:
        if protocol != "SASL_SSL":
            raise KafkaSecurityError(
                f"AWS_MSK_IAM needs {_var(settings, 'kafka_security_protocol')}=SASL_SSL "
                "(MSK's IAM listener is TLS only)"
            )
    elif not (settings.kafka_sasl_username and settings.kafka_sasl_password):
        raise KafkaSecurityError(
            f"{protocol} with {mechanism} needs {_var(settings, 'kafka_sasl_username')} "
            f"and {_var(settings, 'kafka_sasl_password')}"
        )


def client_options(settings) -> dict[str, Any]:
    """Keyword arguments for every aiokafka client (producer, consumer, admin, AIOKafkaClient); {} for PLAINTEXT."""
    _check(settings)
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in TLS_PROTOCOLS:
        from aiokafka.helpers import create_ssl_context

        # No CA file: the system's CAs (as for MSK, whose certificates are public).
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile or None,
            certfile=settings.kafka_ssl_certfile or None,
            keyfile=settings.kafka_ssl_keyfile or None,
        )
    if protocol in SASL_PROTOCOLS:
        if settings.kafka_sasl_mechanism == MSK_IAM:
            options["sasl_mechanism"] = "OAUTHBEARER"  # what MSK's IAM listener speaks to non-Java clients
            options["sasl_oauth_token_provider"] = msk_token_provider(settings.kafka_aws_region or settings.s3_region)
        else:
            options["sasl_mechanism"] = settings.kafka_sasl_mechanism
            options["sasl_plain_username"] = settings.kafka_sasl_username
            options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


def faust_credentials(settings):
    """What ``faust.App(broker_credentials=...)`` takes for these settings; None for PLAINTEXT.

    Faust's aiokafka driver turns these back into the same keyword arguments
    (``credentials_to_aiokafka_auth``) for its consumer, producer and admin client.
    """
    options = client_options(settings)
    if not options:
        return None
    import faust

    context = options.get("ssl_context")
    if "sasl_oauth_token_provider" in options:
        return faust.OAuthCredentials(oauth_cb=options["sasl_oauth_token_provider"], ssl_context=context)
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            mechanism=options["sasl_mechanism"],
            ssl_context=context,  # SASL_SSL when given, SASL_PLAINTEXT without
        )
    return faust.SSLCredentials(context)


def msk_token_provider(region: str):
    """An aiokafka OAUTHBEARER token provider signing MSK IAM tokens with the process's AWS credentials."""
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
    except ImportError as exc:
        raise KafkaSecurityError(
            "AWS_MSK_IAM needs aws-msk-iam-sasl-signer-python: pip install 'docflow[msk]'"
        ) from exc
    from aiokafka.abc import AbstractTokenProvider

    class MskIamTokenProvider(AbstractTokenProvider):
        def __init__(self) -> None:
            self._token = ""
            self._signed_at = 0.0

        async def token(self) -> str:
            if not self._token or time.monotonic() - self._signed_at > MSK_TOKEN_REUSE_SECONDS:
                # Off the event loop: the credential chain may ask the instance metadata service.
                self._token, _expiry_ms = await asyncio.to_thread(MSKAuthTokenProvider.generate_auth_token, region)
                self._signed_at = time.monotonic()
            return self._token

    return MskIamTokenProvider()


def _jaas_quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def java_properties(settings) -> dict[str, str]:
    """Kafka client properties for the JVM jobs (Flink's 'properties.*', Spark's 'kafka.*'); {} for PLAINTEXT.

    PEM files are read by the brokers' own client (Kafka 2.7+): a CA bundle as the trust
    store; a client certificate as a key store holding the PKCS#8 key and the chain in one
    file. AWS_MSK_IAM needs the aws-msk-iam-auth jar on the job's classpath.
    """
    _check(settings)
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    properties = {"security.protocol": protocol}
    if protocol in TLS_PROTOCOLS:
        if settings.kafka_ssl_cafile:
            properties["ssl.truststore.type"] = "PEM"
            properties["ssl.truststore.location"] = settings.kafka_ssl_cafile
        if settings.kafka_ssl_certfile:
            if settings.kafka_ssl_keyfile and settings.kafka_ssl_keyfile != settings.kafka_ssl_certfile:
                raise KafkaSecurityError(
                    "the JVM jobs read a client certificate and its key from one PEM file: put the PKCS#8 key and "
                    f"the certificate chain in {_var(settings, 'kafka_ssl_certfile')} and leave "
                    f"{_var(settings, 'kafka_ssl_keyfile')} empty (the Python clients read that file too)"
                )
            properties["ssl.keystore.type"] = "PEM"
            properties["ssl.keystore.location"] = settings.kafka_ssl_certfile
    if protocol in SASL_PROTOCOLS:
        mechanism = settings.kafka_sasl_mechanism
        properties["sasl.mechanism"] = mechanism
        if mechanism == MSK_IAM:
            properties["sasl.jaas.config"] = f"{MSK_IAM_LOGIN_MODULE} required;"
            properties["sasl.client.callback.handler.class"] = MSK_IAM_CALLBACK_HANDLER
        else:
            properties["sasl.jaas.config"] = (
                f"{LOGIN_MODULES[mechanism]} required username={_jaas_quoted(settings.kafka_sasl_username)} "
                f"password={_jaas_quoted(settings.kafka_sasl_password)};"
            )
    return properties


def properties_file(properties: dict[str, str]) -> str:
    """``properties`` in java.util.Properties' file format (a Kafka client.properties)."""

    def escaped(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")

    def escaped_key(key: str) -> str:
        return escaped(key).replace("=", "\\=").replace(":", "\\:").replace(" ", "\\ ")

    return "".join(f"{escaped_key(key)}={escaped(value)}\n" for key, value in properties.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.broker_security",
        description="Write the Kafka client properties of the DOCFLOW_KAFKA_* settings (for the Flink and Spark "
        "jobs' --kafka-properties, or Kafka's tools' --command-config).",
    )
    parser.add_argument("--output", help="file to write (readable by its owner only); standard output when unset")
    args = parser.parse_args(argv)
    from pipeline.settings import Settings

    try:
        text = properties_file(java_properties(Settings()))
    except KafkaSecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        descriptor = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            os.fchmod(descriptor, 0o600)  # also when the file was there before: it may hold a password
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
