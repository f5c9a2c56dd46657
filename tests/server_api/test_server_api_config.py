"""The server's settings: every cross-check build_config makes, without starting anything."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tessera._daemon.sockets import STAGING_OVERHEAD
from tessera.sdk import rundir
from tessera.sdk.config import ConfigError, load_settings
from tessera.server.config import SETTINGS, ServerConfig, build_config, default_admin_socket, parse_host_port


def config(**values: Any) -> ServerConfig:
    base: dict[str, Any] = {"trust_domain": "example.org", "socket": "/tmp/tessera-test/api.sock"}
    base.update(values)
    return build_config(load_settings("server", SETTINGS, None, base))


def test_defaults_follow_cli_md() -> None:
    c = config()
    assert (c.bind_host, c.bind_port) == ("127.0.0.1", 8081)
    assert c.data_dir == Path(".tessera/server")
    assert c.ca_ttl == 86400 and c.default_x509_svid_ttl == 3600 and c.default_jwt_svid_ttl == 300
    assert c.agent_ttl == 3600 and c.join_token_ttl == 600
    assert c.dns_names == ("localhost",) and c.ca_key_type == "ec-p256"
    assert c.bind_ip == ipaddress.ip_address("127.0.0.1")
    assert c.federation_host is None and c.datastore == ""


def test_durations_lists_and_addresses_are_parsed() -> None:
    c = config(ca_ttl="2d", default_x509_svid_ttl="90m", dns_names="a.example, b.example", bind_address="[::1]:9000")
    assert c.ca_ttl == 172800 and c.default_x509_svid_ttl == 5400
    assert c.dns_names == ("a.example", "b.example")
    assert (c.bind_host, c.bind_port, c.bind_address) == ("::1", 9000, "[::1]:9000")
    assert config(bind_address="server.internal:8081").bind_ip is None


def test_agent_svids_may_be_shorter_than_workload_svids() -> None:
    assert config(agent_ttl="30s").agent_ttl == 30
    with pytest.raises(ConfigError, match="default_x509_svid_ttl: must be at least 60s"):
        config(default_x509_svid_ttl="30s")


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"trust_domain": "spiffe://example.org/path"}, "trust_domain"),
        ({"bind_address": "8081"}, "bind_address"),
        ({"bind_address": "::1:8081"}, "bind_address"),
        ({"bind_address": "host:99999"}, "bind_address"),
        ({"log_level": "loud"}, "log_level"),
        ({"log_format": "xml"}, "log_format"),
        ({"ca_key_type": "dsa"}, "ca_key_type"),
        ({"ca_ttl": "5m"}, "ca_ttl"),
        ({"default_x509_svid_ttl": "30s"}, "default_x509_svid_ttl"),
        ({"agent_ttl": "48h"}, "agent_ttl"),
        ({"agent_ttl": "20s"}, "agent_ttl"),
        ({"dns_names": "bad name"}, "dns_names"),
        ({"upstream_authority_cert": "/etc/hostname"}, "upstream_authority"),
        ({"x509pop_ca_bundle": "/nonexistent.pem"}, "x509pop_ca_bundle"),
        ({"socket": "/tmp/" + "x" * 120 + "/api.sock"}, "socket"),
        ({"federation_bind_address": "nope"}, "federation_bind_address"),
        ({"federation_profile": "ftp"}, "federation_profile"),
        ({"federation_bind_address": "127.0.0.1:0", "federation_profile": "https_web"}, "federation_cert"),
    ],
)
def test_bad_settings_name_the_key(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config(**values)


def test_parse_host_port() -> None:
    assert parse_host_port("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_host_port("[fe80::1]:443") == ("fe80::1", 443)
    with pytest.raises(ConfigError):
        parse_host_port(":80")


def test_admin_socket_defaults_to_run_as_root_and_to_the_users_own_directory_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert config(socket=None).socket_path == Path("/run/tessera-server/api.sock")  # the suite runs as root
    monkeypatch.setattr(rundir.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_admin_socket() == "/run/user/1000/tessera-server/api.sock"
    assert config(socket=None).socket_path == Path("/run/user/1000/tessera-server/api.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_admin_socket().endswith("/.tessera/run/server/api.sock")


def test_a_socket_path_too_long_to_bind_through_its_staging_directory_is_refused_up_front() -> None:
    directory = "/" + "d" * (107 - STAGING_OVERHEAD - 1)
    assert config(socket=f"{directory}/api.sock").socket_path == Path(f"{directory}/api.sock")
    with pytest.raises(ConfigError, match=r"^socket: .*\.XXXXXXXX/s"):
        config(socket=f"{directory}x/api.sock")
