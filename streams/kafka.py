"""How every Kafka client safeswap makes connects: one mapping from Settings.

Every aiokafka client (the Emitter, the FlagClient, the CLI, the sinks,
checkpoints, the dashboard) gets ``**client_options(settings)``; Faust gets
``broker_credentials=credentials(settings)``. Both read the same validated
``security(settings)``, and a test checks that Faust's own translation of the
credentials gives the clients' options, so the worker and the clients can never
disagree. Only ``credentials`` imports Faust: apps that use the SDK never load it.

    SAFESWAP_KAFKA_SECURITY_PROTOCOL   PLAINTEXT (default) | SSL | SASL_PLAINTEXT | SASL_SSL
    SAFESWAP_KAFKA_SASL_MECHANISM      PLAIN (default) | SCRAM-SHA-256 | SCRAM-SHA-512
    SAFESWAP_KAFKA_SASL_USERNAME / SAFESWAP_KAFKA_SASL_PASSWORD
    SAFESWAP_KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE   (PEM files; empty: the system CAs)
"""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from streams.settings import Settings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def ssl_context(settings: Settings):
    return create_ssl_context(
        cafile=settings.kafka_ssl_cafile or None,
        certfile=settings.kafka_ssl_certfile or None,
        keyfile=settings.kafka_ssl_keyfile or None,
    )


def security(settings: Settings) -> tuple[str, str | None]:
    """(protocol, SASL mechanism or None), validated; a ValueError names the variable to fix."""
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"SAFESWAP_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol!r}: use one of {', '.join(PROTOCOLS)}"
        )
    if not protocol.startswith("SASL"):
        return protocol, None
    mechanism = (settings.kafka_sasl_mechanism or "PLAIN").upper()
    if mechanism not in MECHANISMS:
        raise ValueError(
            f"SAFESWAP_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism!r}: use one of {', '.join(MECHANISMS)}"
        )
    if not settings.kafka_sasl_username:
        raise ValueError(f"{protocol} needs SAFESWAP_KAFKA_SASL_USERNAME and SAFESWAP_KAFKA_SASL_PASSWORD")
    return protocol, mechanism


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client: bootstrap servers plus security."""
    protocol, mechanism = security(settings)
    options: dict[str, Any] = {"bootstrap_servers": settings.broker, "security_protocol": protocol}
    if protocol == "SSL":
        options["ssl_context"] = ssl_context(settings)
    elif mechanism is not None:
        options.update(
            sasl_mechanism=mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password,
            ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
        )
    return options


def credentials(settings: Settings) -> Any:
    """Faust credentials (``SASLCredentials`` / ``SSLCredentials``) for the configured protocol;
    None for PLAINTEXT."""
    protocol, mechanism = security(settings)
    if protocol == "PLAINTEXT":
        return None
    from faust.auth import SASLCredentials, SSLCredentials

    if protocol == "SSL":
        return SSLCredentials(ssl_context(settings))
    return SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
        mechanism=mechanism,
    )
