"""Default socket paths: /run as root, the user's own runtime directory otherwise, never a shared /tmp name."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tessera.sdk import rundir
from tessera.sdk.rundir import describe_runtime_path, runtime_path
from tessera.sdk.workloadapi import wire

AGENT = ("tessera-agent/public/api.sock", "agent/api.sock")


def test_root_gets_run_whatever_the_environment() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert runtime_path(*AGENT, euid=0, environ=env) == "/run/tessera-agent/public/api.sock"


def test_other_users_get_their_runtime_directory_then_their_home() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000/"}
    assert runtime_path(*AGENT, euid=1000, environ=env) == "/run/user/1000/tessera-agent/public/api.sock"
    home = runtime_path(*AGENT, euid=1000, environ={}, home_dir="/home/ann")
    assert home == "/home/ann/.tessera/run/agent/api.sock"
    # a relative XDG_RUNTIME_DIR is invalid (XDG spec): ignored
    assert runtime_path(*AGENT, euid=1000, environ={"XDG_RUNTIME_DIR": "run"}, home_dir="/h") == (
        "/h/.tessera/run/agent/api.sock"
    )


def test_home_comes_from_the_account_not_from_home_env() -> None:
    account = pwd.getpwuid(65534).pw_dir.rstrip("/")
    path = runtime_path("x/api.sock", "x/api.sock", euid=65534, environ={"HOME": "/root"})
    assert path == f"{account}/.tessera/run/x/api.sock"


def test_the_rule_in_words_names_every_branch() -> None:
    text = describe_runtime_path(*AGENT)
    assert "/run/tessera-agent/public/api.sock as root" in text
    assert "$XDG_RUNTIME_DIR/tessera-agent/public/api.sock" in text and "~/.tessera/run/agent/api.sock" in text


def test_the_agent_default_is_out_of_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wire.default_socket_path(euid=0) == "/run/tessera-agent/public/api.sock"
    assert os.geteuid() == 0  # the suite runs as root
    assert wire.default_socket_path() == "/run/tessera-agent/public/api.sock"
    monkeypatch.setattr(rundir.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert wire.default_socket_path() == "/run/user/1000/tessera-agent/public/api.sock"


def test_clients_call_their_own_agent_when_it_runs_else_the_host_agent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert wire.client_socket_path() == "/run/tessera-agent/public/api.sock"  # root
    monkeypatch.setattr(rundir.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert wire.client_socket_path() == "/run/tessera-agent/public/api.sock"  # no agent of their own
    own = f"{tmp_path}/tessera-agent/public/api.sock"
    os.makedirs(os.path.dirname(own))
    Path(own).touch()  # its existence is what counts
    assert wire.client_socket_path() == own
    assert wire.default_address() == "unix://" + own
