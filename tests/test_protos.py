"""The committed stubs are what the generator makes now, and they coexist with the `spiffe` package's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True
    )
    committed = ROOT / "tessera" / "proto"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    existing = {p.name: p.read_text() for p in committed.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(existing), "stub files differ: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != existing[name]]
    assert not stale, f"stale generated stubs {stale}: run scripts/gen_protos.py"


def test_workload_field_numbers_match_the_standard() -> None:
    from tessera.proto import workload_pb2 as pb

    def numbers(msg: type) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.X509SVIDResponse) == {"svids": 1, "crl": 2, "federated_bundles": 3}
    assert numbers(pb.X509SVID) == {"spiffe_id": 1, "x509_svid": 2, "x509_svid_key": 3, "bundle": 4, "hint": 5}
    assert numbers(pb.X509BundlesResponse) == {"crl": 1, "bundles": 2}
    assert numbers(pb.JWTSVIDRequest) == {"audience": 1, "spiffe_id": 2}
    assert numbers(pb.JWTSVID) == {"spiffe_id": 1, "svid": 2, "hint": 3}
    assert numbers(pb.JWTBundlesResponse) == {"bundles": 1}
    assert numbers(pb.ValidateJWTSVIDRequest) == {"audience": 1, "svid": 2}
    assert numbers(pb.ValidateJWTSVIDResponse) == {"spiffe_id": 1, "claims": 2}


def test_both_generated_protos_import_in_one_process() -> None:
    code = (
        "from spiffe._proto import workload_pb2 as theirs\n"
        "from tessera.proto import workload_pb2 as ours\n"
        "m = ours.X509SVIDResponse(svids=[ours.X509SVID(spiffe_id='spiffe://a.test/w', x509_svid=b'x',"
        " x509_svid_key=b'k', bundle=b'b', hint='h')], federated_bundles={'spiffe://b.test': b'c'})\n"
        "t = theirs.X509SVIDResponse.FromString(m.SerializeToString())\n"
        "assert t.svids[0].spiffe_id == 'spiffe://a.test/w' and t.svids[0].hint == 'h'\n"
        "assert t.federated_bundles['spiffe://b.test'] == b'c'\n"
        "assert ours.X509SVIDResponse.FromString(t.SerializeToString()) == m\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
