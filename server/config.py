"""The server's settings: what `tessera-server run` reads from `[server]` in TOML and from flags.

Everything is checked here, before any file is opened or port bound, so a mistake stops start-up with one
line naming the key rather than surfacing later as a half-started daemon.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera._daemon.sockets import path_length_problem
from tessera.sdk.config import ConfigError, Setting, load_settings, parse_duration
from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.logs import LEVELS
from tessera.sdk.rundir import describe_runtime_path, runtime_path
from tessera.sdk.spiffeid import TrustDomain
from tessera.server.opsconfig import OPS_SETTINGS, OpsConfig, build_ops_config

_ADMIN_SOCKET_UNDER_RUN = "tessera-server/api.sock"
_ADMIN_SOCKET_UNDER_HOME = "server/api.sock"
DEFAULT_SOCKET_RULE = describe_runtime_path(_ADMIN_SOCKET_UNDER_RUN, _ADMIN_SOCKET_UNDER_HOME)
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")

SETTINGS: tuple[Setting, ...] = (
    Setting("trust_domain", "str", required=True, help="trust domain served, e.g. example.org"),
    Setting("data_dir", "path", "./.tessera/server", help="directory for CA keys and the SQLite datastore"),
    Setting("bind_address", "str", "127.0.0.1:8081", help="HOST:PORT of the node API (TLS) for agents"),
    Setting(
        "socket",
        "path",
        None,
        help=f"admin API Unix socket; its directory must be the server's own, made 0700 when missing "
        f"(default: {DEFAULT_SOCKET_RULE})",
    ),
    Setting("datastore", "str", None, help="datastore URL (default: SQLite in the data dir)"),
    Setting("log_level", "str", "info", help="debug, info, warning or error"),
    Setting("log_format", "str", "text", help="text or json"),
    Setting("ca_key_type", "str", "ec-p256", help="ec-p256, ec-p384 or rsa-2048"),
    Setting("ca_ttl", "duration", "24h", help="life of each CA certificate"),
    Setting("default_x509_svid_ttl", "duration", "1h", help="X509-SVID life when an entry sets none"),
    Setting("default_jwt_svid_ttl", "duration", "5m", help="JWT-SVID life when an entry sets none"),
    Setting("agent_ttl", "duration", "1h", help="life of agent SVIDs"),
    Setting("join_token_ttl", "duration", "10m", help="default life of join tokens"),
    Setting(
        "join_grace",
        "duration",
        "15s",
        help="a new server joining a trust domain others serve publishes its CA, then signs nothing for agents "
        "this long, so agents syncing with the others learn the CA first (0: off)",
    ),
    Setting("dns_names", "list", ["localhost"], help="DNS names in the server's own SVID (comma separated)"),
    Setting("upstream_authority_cert", "path", None, help="PEM CA certificate (chain) that signs the server CA"),
    Setting("upstream_authority_key", "path", None, help="PEM private key of the upstream CA"),
    Setting("upstream_authority_bundle", "path", None, help="PEM roots of the upstream PKI (default: its cert)"),
    Setting("x509pop_ca_bundle", "list", [], help="PEM file(s) of CAs that issue x509pop host certificates"),
    Setting("federation_bind_address", "str", None, help="HOST:PORT of the HTTPS bundle endpoint (off if unset)"),
    Setting("federation_profile", "str", "https_spiffe", help="bundle endpoint TLS: https_spiffe or https_web"),
    Setting("federation_cert", "path", None, help="https_web: PEM certificate chain of the bundle endpoint"),
    Setting("federation_key", "path", None, help="https_web: PEM private key of the bundle endpoint"),
    Setting("federation_refresh_hint", "duration", "5m", help="spiffe_refresh_hint the bundle endpoint advertises"),
    *OPS_SETTINGS,  # key manager (disk / pkcs11), metrics listener, rate limits: see tessera.server.opsconfig
)


def default_admin_socket() -> str:
    """The admin socket ``tessera-server run`` and the admin commands use when not told: ``/run/tessera-server/
    api.sock`` as root, a directory of the user's own otherwise (see tessera.sdk.rundir), never a shared /tmp
    path another user could create first."""
    return runtime_path(_ADMIN_SOCKET_UNDER_RUN, _ADMIN_SOCKET_UNDER_HOME)


MIN_SVID_TTL = 60.0
# Agent SVIDs renew themselves over an open mTLS connection at half life, so a shorter floor is safe for them
# (and lets an operator, or a fault test, shorten the window in which a stolen agent key is useful).
MIN_AGENT_SVID_TTL = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    trust_domain: TrustDomain
    data_dir: Path
    bind_host: str
    bind_port: int
    socket_path: Path
    datastore: str  # "" = SQLite in the data dir; see tessera.server.datastore.open_datastore
    log_level: str
    log_format: str
    ca_key_type: str
    ca_ttl: float
    default_x509_svid_ttl: float
    default_jwt_svid_ttl: float
    agent_ttl: float
    join_token_ttl: float
    dns_names: tuple[str, ...]
    upstream_authority_cert: Path | None
    upstream_authority_key: Path | None
    upstream_authority_bundle: Path | None
    x509pop_ca_bundle: tuple[Path, ...]
    federation_host: str | None = None
    federation_port: int = 0
    federation_profile: str = "https_spiffe"
    federation_cert: Path | None = None
    federation_key: Path | None = None
    federation_refresh_hint: float = 300.0
    join_grace: float = 15.0
    ops: OpsConfig = field(default_factory=OpsConfig)

    @property
    def bind_address(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{self.bind_port}"

    @property
    def bind_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The bind host as an IP literal (it then goes into the server SVID as an IP SAN), else None."""
        try:
            return ipaddress.ip_address(self.bind_host)
        except ValueError:
            return None


def parse_host_port(text: str, key: str = "bind_address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT``; port 0 asks the kernel for a free one (tests)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{key}: write IPv6 addresses in brackets, e.g. [::1]:8081, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{key}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: port {port} is out of range 0-65535")
    return host, port


def _optional_path(value: Any) -> Path | None:
    return Path(value) if value else None


def build_config(values: Mapping[str, Any]) -> ServerConfig:
    """Cross-checks the loaded settings and returns the typed configuration (ConfigError on any problem)."""
    values = dict(values)
    for setting in SETTINGS:  # defaults are written like the operator would ("24h"): coerce them too
        if setting.kind == "duration" and values.get(setting.name) is not None:
            values[setting.name] = parse_duration(values[setting.name], setting.name)
    try:
        td = TrustDomain.parse(values["trust_domain"])
    except SpiffeIdError as exc:
        raise ConfigError(f"trust_domain: {exc}") from None
    host, port = parse_host_port(values["bind_address"])
    level = str(values["log_level"]).lower()
    if level not in LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LEVELS)}, got {values['log_level']!r}")
    fmt = str(values["log_format"]).lower()
    if fmt not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {values['log_format']!r}")
    key_type = str(values["ca_key_type"]).lower()
    if key_type not in KEY_TYPES:
        raise ConfigError(f"ca_key_type: expected one of {', '.join(KEY_TYPES)}, got {values['ca_key_type']!r}")
    ca_ttl = float(values["ca_ttl"])
    if ca_ttl < 600:
        raise ConfigError(f"ca_ttl: must be at least 10m, got {ca_ttl:g}s")
    for key in ("default_x509_svid_ttl", "default_jwt_svid_ttl", "agent_ttl"):
        ttl = float(values[key])
        floor = MIN_AGENT_SVID_TTL if key == "agent_ttl" else MIN_SVID_TTL
        if ttl < floor:
            raise ConfigError(f"{key}: must be at least {floor:g}s, got {ttl:g}s")
        if ttl > ca_ttl:
            raise ConfigError(f"{key}: must not exceed ca_ttl ({ca_ttl:g}s), got {ttl:g}s")
    join_ttl = float(values["join_token_ttl"])
    if join_ttl <= 0:
        raise ConfigError("join_token_ttl: must be positive")
    join_grace = float(values["join_grace"])
    if join_grace < 0:
        raise ConfigError("join_grace: must not be negative (0 turns the join grace period off)")
    dns_names = tuple(values["dns_names"] or ())
    for name in dns_names:
        if not name or " " in name or "/" in name:
            raise ConfigError(f"dns_names: {name!r} is not a DNS name")
    cert = _optional_path(values["upstream_authority_cert"])
    key_path = _optional_path(values["upstream_authority_key"])
    if (cert is None) != (key_path is None):
        raise ConfigError("upstream_authority_cert and upstream_authority_key must be given together")
    bundle = _optional_path(values["upstream_authority_bundle"])
    if bundle is not None and cert is None:
        raise ConfigError("upstream_authority_bundle: needs upstream_authority_cert and upstream_authority_key")
    given: tuple[tuple[str, Path | None], ...] = (
        ("upstream_authority_cert", cert),
        ("upstream_authority_key", key_path),
        ("upstream_authority_bundle", bundle),
    )
    for name, path in given:
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    pop_paths = tuple(Path(p) for p in values["x509pop_ca_bundle"] or ())
    for path in pop_paths:
        if not path.is_file():
            raise ConfigError(f"x509pop_ca_bundle: {path} is not a readable file")
    data_dir = Path(values["data_dir"]).expanduser()
    socket_path = Path(values["socket"] or default_admin_socket()).expanduser().absolute()
    socket_problem = path_length_problem(str(socket_path))
    if socket_problem:
        raise ConfigError(f"socket: {socket_problem}")
    datastore = values["datastore"] or ""
    fed_host: str | None = None
    fed_port = 0
    if values.get("federation_bind_address"):
        fed_host, fed_port = parse_host_port(values["federation_bind_address"], "federation_bind_address")
    profile = str(values.get("federation_profile") or "https_spiffe")
    if profile not in ("https_spiffe", "https_web"):
        raise ConfigError(f"federation_profile: expected https_spiffe or https_web, got {profile!r}")
    fed_cert = _optional_path(values.get("federation_cert"))
    fed_key = _optional_path(values.get("federation_key"))
    if profile == "https_web" and fed_host is not None and (fed_cert is None or fed_key is None):
        raise ConfigError("federation_profile https_web needs federation_cert and federation_key")
    refresh_hint = float(values.get("federation_refresh_hint") or 300.0)
    if not 1 <= refresh_hint <= 86400:
        raise ConfigError(f"federation_refresh_hint: must be between 1s and 1d, got {refresh_hint:g}s")
    for name, path in (("federation_cert", fed_cert), ("federation_key", fed_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    return ServerConfig(
        trust_domain=td,
        data_dir=data_dir,
        bind_host=host,
        bind_port=port,
        socket_path=socket_path,
        datastore=datastore,
        log_level=level,
        log_format=fmt,
        ca_key_type=key_type,
        ca_ttl=ca_ttl,
        default_x509_svid_ttl=float(values["default_x509_svid_ttl"]),
        default_jwt_svid_ttl=float(values["default_jwt_svid_ttl"]),
        agent_ttl=float(values["agent_ttl"]),
        join_token_ttl=join_ttl,
        dns_names=dns_names,
        upstream_authority_cert=cert,
        upstream_authority_key=key_path,
        upstream_authority_bundle=bundle,
        x509pop_ca_bundle=pop_paths,
        federation_host=fed_host,
        federation_port=fed_port,
        federation_profile=profile,
        federation_cert=fed_cert,
        federation_key=fed_key,
        federation_refresh_hint=refresh_hint,
        join_grace=join_grace,
        ops=build_ops_config(values),
    )


def load_config(config_file: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    return build_config(load_settings("server", SETTINGS, config_file, overrides))
