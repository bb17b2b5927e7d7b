"""Kafka SASL/TLS settings reach Faust and every aiokafka client the same way."""

from __future__ import annotations

import ssl
import subprocess

import pytest

from streams.app import create_app
from streams.kafka import client_options, credentials
from streams.settings import Settings


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    """A self-signed CA certificate (openssl) to load as the trusted CA file."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "ca.key", folder / "ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=safeswap-test-ca",
        ],
        check=True,
        capture_output=True,
    )
    return cert


def test_plaintext_by_default():
    settings = Settings(broker="k1:9092,k2:9092")
    assert credentials(settings) is None
    assert client_options(settings) == {"bootstrap_servers": "k1:9092,k2:9092", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_scram_maps_to_aiokafka_and_faust(pem):
    settings = Settings.from_env(
        {
            "SAFESWAP_BROKER": "k1:9093",
            "SAFESWAP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SAFESWAP_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "SAFESWAP_KAFKA_SASL_USERNAME": "svc-safeswap",
            "SAFESWAP_KAFKA_SASL_PASSWORD": "s3cret-pw",
            "SAFESWAP_KAFKA_SSL_CAFILE": str(pem),
        }
    )
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "svc-safeswap" and options["sasl_plain_password"] == "s3cret-pw"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert any(
        ca["subject"] == ((("commonName", "safeswap-test-ca"),),) for ca in options["ssl_context"].get_ca_certs()
    )
    app = create_app(settings)
    assert app.conf.broker_credentials.username == "svc-safeswap"
    assert app.conf.broker_credentials.protocol.value == "SASL_SSL"
    assert "s3cret-pw" not in repr(settings)  # secrets never printed


def test_sasl_plaintext_and_ssl_only(pem):
    plain = client_options(
        Settings(
            broker="k:1", kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p"
        )
    )
    assert (plain["security_protocol"], plain["sasl_mechanism"], plain["ssl_context"]) == (
        "SASL_PLAINTEXT",
        "PLAIN",
        None,
    )
    tls = client_options(Settings(broker="k:1", kafka_security_protocol="ssl", kafka_ssl_cafile=str(pem)))
    assert tls["security_protocol"] == "SSL" and isinstance(tls["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"kafka_security_protocol": "TLS"}, "SAFESWAP_KAFKA_SECURITY_PROTOCOL"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI", "kafka_sasl_username": "u"},
            "SAFESWAP_KAFKA_SASL_MECHANISM",
        ),
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "SAFESWAP_KAFKA_SASL_USERNAME"),
    ],
)
def test_misconfiguration_names_the_variable(fields, words):
    with pytest.raises(ValueError, match=words):
        client_options(Settings(broker="k:1", **fields))


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"kafka_security_protocol": "SSL"},
        {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u", "kafka_sasl_password": "p"},
        {
            "kafka_security_protocol": "sasl_ssl",
            "kafka_sasl_mechanism": "scram-sha-256",
            "kafka_sasl_username": "u",
            "kafka_sasl_password": "p",
        },
    ],
)
def test_the_clients_options_are_fausts_translation_of_its_credentials(fields, pem):
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    settings = Settings(broker="k:1", kafka_ssl_cafile=str(pem), **fields)

    def comparable(options):  # two SSL contexts from the same files: compare what they trust
        return {k: (v.get_ca_certs() if isinstance(v, ssl.SSLContext) else v) for k, v in options.items()}

    faust_options = {"bootstrap_servers": "k:1", **credentials_to_aiokafka_auth(credentials(settings))}
    assert comparable(client_options(settings)) == comparable(faust_options)
