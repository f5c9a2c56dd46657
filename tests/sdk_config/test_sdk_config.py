from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import pytest

from tessera.sdk.config import ConfigError, Setting, add_arguments, load_settings, parse_duration
from tessera.sdk.logs import setup_logging

SETTINGS = [
    Setting("trust_domain", required=True),
    Setting("bind_address", default="127.0.0.1:8081"),
    Setting("ca_ttl", "duration", default=86400),
    Setting("workers", "int", default=4),
    Setting("insecure_bootstrap", "bool", default=False),
    Setting("dns_names", "list", default=["localhost"]),
]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), (90, 90), ("90s", 90), ("10m", 600), ("1h", 3600), ("7d", 604800), ("1.5m", 90), ("250ms", 0.25)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "1x", "-5s", "h", "1 h 2", -1, True])
def test_bad_durations_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match="ca_ttl"):
        parse_duration(bad, "ca_ttl")  # type: ignore[arg-type]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_file_then_flags_override(tmp_path: Path) -> None:
    cfg = write(
        tmp_path, '[server]\ntrust_domain = "example.org"\nca_ttl = "2h"\nworkers = 8\ndns_names = ["a", "b"]\n'
    )
    out = load_settings("server", SETTINGS, cfg, {"workers": "16", "bind_address": None, "command": "run"})
    assert out == {
        "trust_domain": "example.org",
        "bind_address": "127.0.0.1:8081",
        "ca_ttl": 7200.0,
        "workers": 16,
        "insecure_bootstrap": False,
        "dns_names": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\ntrust_domain = "x"\nbogus = 1\n', "unknown key 'bogus'"),
        ('[server]\ntrust_domain = "x"\nworkers = "many"\n', "workers"),
        ('[server]\nbind_address = "x"\n', "missing required setting 'trust_domain'"),
        ("[server\n", "not valid TOML"),
        ('[server]\ntrust_domain = "x"\n[agent]\n', "unknown key or table 'agent'"),
        ('[server]\ntrust-domain = "x"\n', "did you mean 'trust_domain'"),
    ],
)
def test_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings("server", SETTINGS, write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("server", SETTINGS, "/nonexistent/c.toml")


def test_argparse_flags_feed_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, SETTINGS)
    ns = parser.parse_args(["--trust-domain", "td.test", "--insecure-bootstrap", "--dns-names", "x,y"])
    out = load_settings("agent", SETTINGS, ns.config, vars(ns))
    assert out["trust_domain"] == "td.test"
    assert out["insecure_bootstrap"] is True
    assert out["dns_names"] == ["x", "y"]


def test_json_logs_carry_extras_and_redact_keys() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    try:
        logging.getLogger("t").info(
            "loaded %s", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", extra={"agent_id": "a"}
        )
        doc = json.loads(stream.getvalue())
        assert doc["agent_id"] == "a" and doc["level"] == "info" and "AAAA" not in doc["msg"]
    finally:
        logging.getLogger().handlers.clear()


def test_bad_log_level() -> None:
    with pytest.raises(ConfigError):
        setup_logging("loud", "text")
