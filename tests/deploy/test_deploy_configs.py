"""Every example configuration in deploy/ loads through the daemon's own settings, so the examples an
operator copies cannot drift from the flags the code accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from tessera.agent.daemon import SETTINGS as AGENT_SETTINGS
from tessera.agent.daemon import AgentSettings
from tessera.sdk.config import load_settings
from tessera.sdk.helper.config import load_config as load_helper_config
from tessera.server.config import SETTINGS as SERVER_SETTINGS
from tessera.server.config import load_config as load_server_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_server_config_loads() -> None:
    config = load_server_config(DEPLOY / "config" / "server.toml")
    assert str(config.trust_domain) == "example.org"


def test_example_agent_config_loads() -> None:
    values = load_settings("agent", AGENT_SETTINGS, DEPLOY / "config" / "agent.toml")
    assert AgentSettings.from_values(values).socket == "/run/tessera-agent/public/api.sock"


@pytest.mark.parametrize("path", sorted((DEPLOY / "config").glob("helper-*.toml")), ids=lambda p: p.name)
def test_example_helper_configs_load(path: Path) -> None:
    config = load_helper_config(["--config", str(path)], environ={})
    assert config.key_file_mode == 0o600


def test_kubernetes_configmaps_load(tmp_path: Path) -> None:
    for name, table in (("server.yaml", "server"), ("agent.yaml", "agent")):
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()):
            if doc and doc["kind"] == "ConfigMap":
                (text,) = doc["data"].values()
                path = tmp_path / f"{table}.toml"
                path.write_text(text)
                assert tomllib.loads(text)[table]
                # Keys and values are checked; the files they name exist only inside the cluster.
                if table == "server":
                    load_settings("server", SERVER_SETTINGS, path)
                else:
                    AgentSettings.from_values(load_settings("agent", AGENT_SETTINGS, path))
