"""The Kubernetes HA example uses the server's real settings, a PostgreSQL URL the backend accepts without a
password in it, and names in the server SVIDs that agents reach the replicas by."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from tessera.sdk.config import load_settings
from tessera.server.config import SETTINGS, build_config
from tessera.server.datastore.postgres import split_url

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def one(items: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in items if d["kind"] == kind]
    return doc


def test_ha_config_is_valid_server_configuration(tmp_path: Path) -> None:
    items = docs("server-ha.yaml")
    text = one(items, "ConfigMap")["data"]["server.toml"]
    host_ca = tomllib.loads(text)["server"]["x509pop_ca_bundle"]
    (tmp_path / "ca.pem").write_text("")  # the file must exist for the settings check; its content is not read
    (tmp_path / "server.toml").write_text(text.replace(host_ca, str(tmp_path / "ca.pem")))
    config = build_config(load_settings("server", SETTINGS, tmp_path / "server.toml", {}))
    assert config.datastore.startswith("postgresql://")
    conninfo, options = split_url(config.datastore)
    assert "pool_size" in options and "pool_size" not in conninfo
    userinfo = config.datastore.split("//", 1)[1].split("@", 1)[0]
    assert ":" not in userinfo, "the password must come from PGPASSWORD, not the URL"

    (container,) = one(items, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["tessera-server", "run"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "tessera-db"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(config.data_dir) in mounts
    # The admin socket in a directory the server makes itself in the container's /dev/shm (a root-owned sticky
    # tmpfs, writable under readOnlyRootFilesystem): an emptyDir mount is 0777, which the server refuses.
    assert config.socket_path.parent.parent == Path("/dev/shm") and str(config.socket_path.parent) not in mounts
    assert any(host_ca.startswith(m + "/") for m in mounts)
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[-1] == str(config.socket_path)


def test_agents_reach_the_replicas_by_a_name_in_their_svids() -> None:
    server = tomllib.loads(one(docs("server-ha.yaml"), "ConfigMap")["data"]["server.toml"])["server"]
    agent = tomllib.loads(one(docs("agent.yaml"), "ConfigMap")["data"]["agent.toml"])["agent"]
    host = agent["server_address"].rsplit(":", 1)[0]
    assert host in server["dns_names"]
    service = one(docs("server-ha.yaml"), "Service")
    assert service["metadata"]["name"] == host.split(".")[0]
    assert int(agent["server_address"].rsplit(":", 1)[1]) == service["spec"]["ports"][0]["port"]
