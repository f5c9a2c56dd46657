"""Operational settings of the server: where CA keys live, the metrics listener, rate limits, connection caps.

Kept apart from :mod:`tessera.server.config` so the hardening knobs have one home; ``config`` appends
:data:`OPS_SETTINGS` to its settings and stores the checked :class:`OpsConfig` as ``ServerConfig.ops``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.sdk.config import ConfigError, Setting
from tessera.server.ca.keymanager import KeyManager

KEY_MANAGERS = ("disk", "pkcs11")

OPS_SETTINGS: tuple[Setting, ...] = (
    Setting("key_manager", "str", "disk", help="where CA private keys live: disk (data dir, 0600) or pkcs11 (HSM)"),
    Setting("pkcs11_module", "path", None, help="pkcs11: the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so"),
    Setting("pkcs11_token_label", "str", None, help="pkcs11: label of the token that holds the CA keys"),
    Setting("pkcs11_pin", "str", None, help="pkcs11: user PIN source, env:VARIABLE or file:/path (never the PIN)"),
    Setting("pkcs11_key_label_prefix", "str", "tessera-ca:", help="pkcs11: label prefix of the keys this server owns"),
    Setting("metrics_bind_address", "str", None, help="HOST:PORT of the Prometheus /metrics listener (off if unset)"),
    Setting("attestation_rate_limit", "int", 60, help="node attestations per minute per source address (0 = no limit)"),
    Setting("signing_rate_limit", "int", 20000, help="X509-SVID signatures per minute per agent (0 = no limit)"),
    Setting(
        "node_api_handshake_timeout",
        "duration",
        "10s",
        help="node API connections that have not finished the TLS handshake by then are closed",
    ),
    Setting(
        "node_api_first_request_timeout",
        "duration",
        "10s",
        help="node API connections that send nothing this long after the TLS handshake are closed",
    ),
    Setting(
        "node_api_max_unauthenticated_connections",
        "int",
        1024,
        help="node API connections open at once without an agent certificate (in handshake, or attesting); "
        "more are closed at once (0 = no limit)",
    ),
    Setting(
        "node_api_max_unauthenticated_connections_per_source",
        "int",
        64,
        help="the same, per source IP address (0 = no limit)",
    ),
)


@dataclass(frozen=True, slots=True)
class OpsConfig:
    key_manager: str = "disk"
    pkcs11_module: Path | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin: str | None = None  # the *source* (env:/file:), never the PIN itself
    pkcs11_key_label_prefix: str = "tessera-ca:"
    metrics_host: str | None = None
    metrics_port: int = 0
    attestation_rate_limit: int = 60
    signing_rate_limit: int = 20000
    node_api_handshake_timeout: float = 10.0
    node_api_first_request_timeout: float = 10.0
    node_api_max_unauthenticated_connections: int = 1024
    node_api_max_unauthenticated_connections_per_source: int = 64


def build_ops_config(values: Mapping[str, Any]) -> OpsConfig:
    from tessera.server.config import parse_host_port  # config imports this module: import at call time

    manager = str(values.get("key_manager") or "disk").lower()
    if manager not in KEY_MANAGERS:
        raise ConfigError(f"key_manager: expected disk or pkcs11, got {values.get('key_manager')!r}")
    module = values.get("pkcs11_module")
    label = values.get("pkcs11_token_label")
    pin = values.get("pkcs11_pin")
    if manager == "pkcs11":
        if not module:
            raise ConfigError("pkcs11_module: required with key_manager = pkcs11 (path of the PKCS#11 library)")
        if not Path(module).is_file():
            raise ConfigError(f"pkcs11_module: {module} is not a readable file")
        if not label:
            raise ConfigError("pkcs11_token_label: required with key_manager = pkcs11")
        if not pin:
            raise ConfigError("pkcs11_pin: required with key_manager = pkcs11 (env:VARIABLE or file:/path)")
    if pin is not None:
        kind, sep, where = str(pin).partition(":")
        if kind not in ("env", "file") or not sep or not where:
            # Never echo the value: it may be the PIN itself.
            raise ConfigError("pkcs11_pin: write env:VARIABLE or file:/path/to/pin (a literal PIN is not accepted)")
    prefix = str(values.get("pkcs11_key_label_prefix") or "tessera-ca:")
    metrics_host: str | None = None
    metrics_port = 0
    if values.get("metrics_bind_address"):
        metrics_host, metrics_port = parse_host_port(values["metrics_bind_address"], "metrics_bind_address")
    limits: dict[str, int] = {}
    for key, unit in (
        ("attestation_rate_limit", "per minute"),
        ("signing_rate_limit", "per minute"),
        ("node_api_max_unauthenticated_connections", "of connections"),
        ("node_api_max_unauthenticated_connections_per_source", "of connections"),
    ):
        raw = values.get(key)
        value = int(raw) if raw is not None else 0
        if value < 0:
            raise ConfigError(f"{key}: must be 0 (no limit) or a positive number {unit}, got {value}")
        limits[key] = value
    timeouts: list[float] = []
    for key in ("node_api_handshake_timeout", "node_api_first_request_timeout"):
        raw_seconds = values.get(key)
        seconds = 10.0 if raw_seconds is None else float(raw_seconds)
        if not 0 < seconds <= 600:
            raise ConfigError(f"{key}: must be more than 0s and at most 10m, got {seconds:g}s")
        timeouts.append(seconds)
    return OpsConfig(
        key_manager=manager,
        pkcs11_module=Path(module) if module else None,
        pkcs11_token_label=label or None,
        pkcs11_pin=pin or None,
        pkcs11_key_label_prefix=prefix,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        node_api_handshake_timeout=timeouts[0],
        node_api_first_request_timeout=timeouts[1],
        **limits,
    )


def make_key_manager(ops: OpsConfig) -> KeyManager | None:
    """The configured key manager, or None for the default (keys on disk in the data dir).

    Raises :class:`~tessera.server.errors.KeyManagerError` (one line, no secret) when the token cannot be used.
    """
    if ops.key_manager != "pkcs11":
        return None
    from tessera.server.ca.pkcs11 import Pkcs11KeyManager, read_pin

    assert ops.pkcs11_module is not None and ops.pkcs11_token_label is not None and ops.pkcs11_pin is not None
    return Pkcs11KeyManager(
        str(ops.pkcs11_module), ops.pkcs11_token_label, read_pin(ops.pkcs11_pin), ops.pkcs11_key_label_prefix
    )
