"""tessera-helper's settings: spiffe-helper's keys, read from a TOML file (``[helper]`` or top-level keys)
and/or flags of the same names, all checked before anything runs."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tessera.sdk.config import ConfigError, Setting, add_arguments, load_settings, read_config_file
from tessera.sdk.workloadapi.wire import CLIENT_SOCKET_RULE, ENDPOINT_SOCKET_ENV, default_address

_ADDRESS_HELP = f"Workload API socket (default: ${ENDPOINT_SOCKET_ENV}, else {CLIENT_SOCKET_RULE})"

SETTINGS: tuple[Setting, ...] = (
    Setting("agent_address", "str", help=_ADDRESS_HELP),
    Setting("cert_dir", "path", required=True, help="directory the files are written to"),
    Setting("svid_file_name", "str", "svid.pem", help="X509-SVID chain file (PEM, leaf first)"),
    Setting("svid_key_file_name", "str", "svid_key.pem", help="private key file (PKCS#8 PEM)"),
    Setting("svid_bundle_file_name", "str", "svid_bundle.pem", help="trust bundle file (PEM CA certificates)"),
    Setting("include_federated_domains", "bool", False, help="also put federated trust domains' CAs in the bundle"),
    Setting("jwt_bundle_file_name", "str", help="JWT bundles file (JSON: trust domain -> JWKS)"),
    Setting("crl_file_name", "str", help="CRL file (PEM, one CRL per CA) for nginx ssl_crl / Apache"),
    Setting("cmd", "str", help="program to start after the first write and to signal on every renewal"),
    Setting("cmd_args", "str", "", help="arguments for cmd (one string, split like a shell would)"),
    Setting("pid_file_name", "path", help="file holding the pid of a process to signal after each write"),
    Setting("renew_signal", "str", help="signal sent on renewal, e.g. SIGHUP or SIGUSR1"),
    Setting("daemon_mode", "bool", True, help="keep running and rewrite on rotation; false = write once and exit"),
    Setting("cert_file_mode", "str", "0644", help="mode of the certificate and bundle files (octal)"),
    Setting("key_file_mode", "str", "0600", help="mode of the key file (octal)"),
    Setting("jwt_svid_file_mode", "str", "0600", help="mode of JWT-SVID files (octal)"),
    Setting("jwt_bundle_file_mode", "str", "0644", help="mode of the JWT bundle file (octal)"),
    Setting("timeout", "duration", 30.0, help="how long to wait for the first SVID"),
    Setting("log_level", "str", "info"),
    Setting("log_format", "str", "text"),
)


@dataclass(frozen=True, slots=True)
class JwtSvidFile:
    audience: str
    file_name: str
    extra_audiences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HelperConfig:
    agent_address: str
    cert_dir: str
    svid_file_name: str
    svid_key_file_name: str
    svid_bundle_file_name: str
    include_federated_domains: bool = False
    jwt_bundle_file_name: str | None = None
    crl_file_name: str | None = None
    jwt_svids: tuple[JwtSvidFile, ...] = ()
    cmd: str | None = None
    cmd_args: tuple[str, ...] = ()
    pid_file_name: str | None = None
    renew_signal: signal.Signals | None = None
    daemon_mode: bool = True
    cert_file_mode: int = 0o644
    key_file_mode: int = 0o600
    jwt_svid_file_mode: int = 0o600
    jwt_bundle_file_mode: int = 0o644
    timeout: float = 30.0
    log_level: str = "info"
    log_format: str = "text"
    extra: Mapping[str, Any] = field(default_factory=dict)


def parse_mode(value: Any, key: str) -> int:
    """File modes as TOML writes them (``0o644``, an integer) or as operators write them (``"0644"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ConfigError(f"{key}: expected an octal file mode such as 0644, got {value!r}") from None
    else:
        raise ConfigError(f"{key}: expected an octal file mode such as 0644, got {value!r}")
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{key}: file mode {oct(mode)} is out of range (0000-0777)")
    return mode


def parse_signal(value: str | None) -> signal.Signals | None:
    if not value:
        return None
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ConfigError(f"renew_signal: unknown signal {value!r} (e.g. SIGHUP, SIGUSR1)") from None


def _file_name(value: str, key: str) -> str:
    if not value or "/" in value or value in (".", ".."):
        raise ConfigError(f"{key}: expected a plain file name inside cert_dir, got {value!r}")
    return value


def _optional_file_name(value: str | None, key: str) -> str | None:
    return _file_name(value, key) if value else None


def _parse_jwt_svids(raw: Any) -> tuple[JwtSvidFile, ...]:
    """spiffe-helper's ``jwt_svids = [{jwt_audience = "...", jwt_svid_file_name = "..."}]``; flags give
    ``AUDIENCE=FILE`` (``--jwt-svids`` repeated)."""
    out: list[JwtSvidFile] = []
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("jwt_svids: expected a list of {jwt_audience, jwt_svid_file_name} tables")
    for item in raw:
        if isinstance(item, str):
            audience, sep, name = item.partition("=")
            if not sep or not audience or not name:
                raise ConfigError(f"jwt_svids: expected AUDIENCE=FILE, got {item!r}")
            out.append(JwtSvidFile(audience, _file_name(name, "jwt_svids")))
            continue
        if not isinstance(item, dict):
            raise ConfigError("jwt_svids: each entry must be a table with jwt_audience and jwt_svid_file_name")
        unknown = sorted(set(item) - {"jwt_audience", "jwt_svid_file_name", "jwt_extra_audiences"})
        if unknown:
            raise ConfigError(f"jwt_svids: unknown key {unknown[0]!r}")
        aud_value = item.get("jwt_audience")
        name_value = item.get("jwt_svid_file_name")
        if not isinstance(aud_value, str) or not aud_value or not isinstance(name_value, str):
            raise ConfigError("jwt_svids: each entry needs jwt_audience and jwt_svid_file_name strings")
        extra = item.get("jwt_extra_audiences", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) and a for a in extra):
            raise ConfigError("jwt_svids: jwt_extra_audiences must be a list of strings")
        out.append(JwtSvidFile(aud_value, _file_name(name_value, "jwt_svids"), tuple(extra)))
    names = [j.file_name for j in out]
    if len(set(names)) != len(names):
        raise ConfigError("jwt_svids: two entries write the same file")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera-helper",
        description="Writes this workload's X509-SVID, key and bundle (and JWT-SVIDs) to files, keeps them "
        "current and tells a process to reload them. Takes spiffe-helper's configuration keys.",
    )
    add_arguments(parser, SETTINGS)
    parser.add_argument(
        "--jwt-svids",
        dest="jwt_svids",
        action="append",
        default=None,
        metavar="AUDIENCE=FILE",
        help="write a JWT-SVID for AUDIENCE to FILE in cert_dir (repeatable)",
    )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> HelperConfig:
    args = vars(build_parser().parse_args(argv))
    env = os.environ if environ is None else environ
    config_file = args.pop("config", None)
    file_values: dict[str, Any] = read_config_file(config_file, "helper") if config_file else {}
    jwt_raw = file_values.pop("jwt_svids", None)
    if args.get("jwt_svids") is not None:
        jwt_raw = args["jwt_svids"]
    known = {s.name for s in SETTINGS}
    for key in file_values:
        if key not in known:
            raise ConfigError(f"config file {config_file}: unknown key {key!r} in [helper]")
    # File values first, then flags on top; load_settings validates and fills defaults.
    merged = {
        k: (oct(v) if k.endswith("_mode") and isinstance(v, int) and not isinstance(v, bool) else v)
        for k, v in file_values.items()
    }
    merged.update({k: v for k, v in args.items() if v is not None and k in known})
    values = load_settings("helper", SETTINGS, None, merged)
    address = values["agent_address"] or env.get(ENDPOINT_SOCKET_ENV) or default_address()
    try:
        cmd_args = tuple(shlex.split(values["cmd_args"] or ""))
    except ValueError as exc:
        raise ConfigError(f"cmd_args: cannot split {values['cmd_args']!r}: {exc}") from None
    renew = parse_signal(values["renew_signal"])
    if values["pid_file_name"] and renew is None:
        raise ConfigError("renew_signal: required with pid_file_name (which signal should the process get?)")
    if values["log_format"] not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {values['log_format']!r}")
    return HelperConfig(
        agent_address=address,
        cert_dir=values["cert_dir"],
        svid_file_name=_file_name(values["svid_file_name"], "svid_file_name"),
        svid_key_file_name=_file_name(values["svid_key_file_name"], "svid_key_file_name"),
        svid_bundle_file_name=_file_name(values["svid_bundle_file_name"], "svid_bundle_file_name"),
        include_federated_domains=values["include_federated_domains"],
        jwt_bundle_file_name=_optional_file_name(values["jwt_bundle_file_name"], "jwt_bundle_file_name"),
        crl_file_name=_optional_file_name(values["crl_file_name"], "crl_file_name"),
        jwt_svids=_parse_jwt_svids(jwt_raw),
        cmd=values["cmd"] or None,
        cmd_args=cmd_args,
        pid_file_name=values["pid_file_name"],
        renew_signal=renew,
        daemon_mode=values["daemon_mode"],
        cert_file_mode=parse_mode(values["cert_file_mode"], "cert_file_mode"),
        key_file_mode=parse_mode(values["key_file_mode"], "key_file_mode"),
        jwt_svid_file_mode=parse_mode(values["jwt_svid_file_mode"], "jwt_svid_file_mode"),
        jwt_bundle_file_mode=parse_mode(values["jwt_bundle_file_mode"], "jwt_bundle_file_mode"),
        timeout=values["timeout"],
        log_level=values["log_level"],
        log_format=values["log_format"],
    )
