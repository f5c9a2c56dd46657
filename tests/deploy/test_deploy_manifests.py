"""The deployment files stay valid: every manifest parses and keeps the fields the design depends on."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("path", sorted((DEPLOY / "kubernetes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses_with_api_version_kind_and_name(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        spec = doc.get("spec", {})
        if "template" in spec:
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), "selector must match pod labels"
            for container in spec["template"]["spec"]["containers"]:
                mounts = {m["name"] for m in container.get("volumeMounts", [])}
                volumes = {v["name"] for v in spec["template"]["spec"].get("volumes", [])}
                claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
                assert mounts <= volumes | claims, f"{path.name}: mounts without volumes: {mounts - volumes - claims}"


def test_agent_daemonset_shares_host_pids_and_socket_directory() -> None:
    docs = documents("agent.yaml")
    pod = by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["agent-socket"]["hostPath"]["path"] == "/run/tessera-agent/public"
    config = tomllib.loads(by_kind(docs, "ConfigMap")["data"]["agent.toml"])["agent"]
    (container,) = pod["containers"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(config["socket"]).parent == Path(mount["agent-socket"])
    assert container["command"][:2] == ["tessera-agent", "run"]


def test_workload_mounts_the_agent_socket_and_points_the_sdk_at_it() -> None:
    pod = by_kind(documents("workload-example.yaml"), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = container["volumeMounts"][0]
    assert env["SPIFFE_ENDPOINT_SOCKET"] == f"unix://{mount['mountPath']}/api.sock"
    assert mount["readOnly"] is True


def test_server_statefulset_keeps_state_on_a_volume() -> None:
    docs = documents("server.yaml")
    sts = by_kind(docs, "StatefulSet")
    config = tomllib.loads(by_kind(docs, "ConfigMap")["data"]["server.toml"])["server"]
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[config["data_dir"]] in claims
    assert "tessera-server" in config["dns_names"]


def test_ha_servers_share_a_postgresql_datastore() -> None:
    deployment = by_kind(documents("server-ha.yaml"), "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    config = tomllib.loads(by_kind(documents("server-ha.yaml"), "ConfigMap")["data"]["server.toml"])["server"]
    assert config["datastore"].startswith("postgresql://")


@pytest.mark.parametrize("unit", sorted((DEPLOY / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_systemd_units_run_hardened(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    service = parser["Service"]
    assert service["ExecStart"].split()[0].startswith("/usr/local/bin/tessera-")
    assert service["NoNewPrivileges"] == "yes"
    assert service["UMask"] == "0077"
    if "helper" not in unit.name:
        assert service["User"] and service["StateDirectory"] and service["ProtectSystem"] == "strict"
    if unit.name == "tessera-agent.service":
        # Workload attestation reads other users' /proc entries (exe, fd) and asks sock_diag who holds a
        # connection's client end: without these the agent refuses every caller of a binary selector.
        assert {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"} <= set(service["AmbientCapabilities"].split())
        assert "AF_NETLINK" in service["RestrictAddressFamilies"].split()


def test_compose_file_parses() -> None:
    doc = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    assert {"server", "agent"} <= doc["services"].keys()
    assert doc["services"]["agent"]["pid"] == "host"
