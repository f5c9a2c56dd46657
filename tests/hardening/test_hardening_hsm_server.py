"""A real `tessera-server run` whose CA keys live in SoftHSM2 (key_manager = "pkcs11"): agents attest,
workloads get SVIDs that verify, the CA rotates and is tainted like with keys on disk, a restart finds the keys
on the token again, and no CA private key is ever written under the data dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from hardening_support import agent_proc, server_proc
from hsm_support import USER_PIN, SoftHsm, assert_no_private_key_under, make_token, softhsm_module
from support.inproc import TD
from support.procs import PY, TesseraAgent, TesseraServer, run, wait_for

from tessera.sdk.bundle import X509Bundle
from tessera.sdk.verify import verify_x509_svid

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(softhsm_module() is None, reason="SoftHSM2 missing: run scripts/system-deps.sh"),
]

AGENT_ID = f"spiffe://{TD}/host/hsm"


def _hsm_server(root: Path, hsm: SoftHsm, port: int | None = None) -> TesseraServer:
    env = {**hsm.env, "TESSERA_TEST_HSM_PIN": USER_PIN}
    return server_proc(
        root, "--key-manager", "pkcs11", "--pkcs11-module", hsm.module, "--pkcs11-token-label", hsm.label,
        "--pkcs11-pin", "env:TESSERA_TEST_HSM_PIN", "--log-level", "debug", env=env, port=port,
    )  # fmt: skip


def _fetch_and_verify(server: TesseraServer, agent: TesseraAgent, out: Path) -> x509.Certificate:
    shutil.rmtree(out, ignore_errors=True)
    wait_for(
        lambda: run(PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", agent.socket, "--write", str(out))
        .returncode == 0,
        what="an X509-SVID",
    )  # fmt: skip
    chain = x509.load_pem_x509_certificates((out / "svid.0.pem").read_bytes())
    sid, _ = verify_x509_svid(chain, X509Bundle.parse_pem(TD, server.admin("bundle", "show").encode()))
    assert str(sid) == f"spiffe://{TD}/hsm/workload"
    return chain[0]


def test_a_server_with_its_ca_keys_in_softhsm(root: Path) -> None:
    hsm = make_token(root / "hsm")
    server = _hsm_server(root, hsm).start_and_wait()
    agent: TesseraAgent | None = None
    try:
        server.write_bundle(root / "bundle.pem")
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/hsm/workload", "--parent-id", AGENT_ID,
            "--selector", "unix:uid:0",
        )  # fmt: skip
        agent = agent_proc(root, server, "agent", "--join-token", server.join_token(AGENT_ID)).start_and_wait()
        first = _fetch_and_verify(server, agent, root / "svid1")
        assert not (server.data_dir / "ca" / "keys").exists() or not any((server.data_dir / "ca" / "keys").iterdir())
        assert_no_private_key_under(server.data_dir, expect_files=True)
        # The token holds the keys (SoftHSM2 stores objects as files in its token dir, not in the data dir).
        assert hsm.token_files()

        # Forced rotation, then taint the old CA: the agent re-signs with the new HSM-held CA.
        slots = json.loads(server.admin("ca", "show", "--output", "json"))
        if isinstance(slots, dict):
            slots = next(v for v in slots.values() if isinstance(v, list))
        (old_id,) = [s["key_id"] for s in slots if s["kind"] == "x509" and s["state"] == "active"]
        server.admin("ca", "prepare")
        server.admin("ca", "activate")
        server.write_bundle(root / "bundle.pem")
        server.admin("ca", "taint", "--id", old_id)

        def resigned() -> bool:
            leaf = _fetch_and_verify(server, agent, root / "svid2")  # type: ignore[arg-type]
            return _aki(leaf) != _aki(first)  # signed by the new CA

        wait_for(resigned, what="an SVID signed by the rotated HSM CA")
        assert_no_private_key_under(server.data_dir, expect_files=True)
        bundle = server.admin("bundle", "show")
        agent.stop()
        agent = None
        server.stop()

        # A restart logs in again and finds the CA keys on the token: same bundle, still signing.
        server = _hsm_server(root, hsm, port=server.port).start_and_wait()
        assert server.admin("bundle", "show") == bundle
        agent = agent_proc(root, server, "agent").start_and_wait()
        _fetch_and_verify(server, agent, root / "svid3")
        assert USER_PIN not in server.output()
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


def _aki(cert: x509.Certificate) -> bytes:
    ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return ext.key_identifier or b""


def test_a_wrong_pin_stops_start_up_with_one_line(root: Path) -> None:
    hsm = make_token(root / "hsm")
    env = {**hsm.env, "TESSERA_TEST_HSM_PIN": "0000"}
    server = server_proc(
        root, "--key-manager", "pkcs11", "--pkcs11-module", hsm.module, "--pkcs11-token-label", hsm.label,
        "--pkcs11-pin", "env:TESSERA_TEST_HSM_PIN", env=env,
    )  # fmt: skip
    server.start()
    assert server.proc is not None
    assert server.proc.wait(60) == 1
    server.proc = None
    lines = [line for line in server.output().splitlines() if line.startswith("tessera-server:")]
    assert lines == [f"tessera-server: error: pkcs11_pin: the PIN for token '{hsm.label}' is incorrect"]
    assert "0000" not in server.output()
    assert not os.path.exists(server.data_dir / "ca" / "keys")
