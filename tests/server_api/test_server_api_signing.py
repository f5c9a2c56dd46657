"""The node API's batch signing path without a network: what it records about every SVID it signs."""

from __future__ import annotations

from pathlib import Path

from server_api_support import TD, csr_der, ec_key

from tessera.proto import node_pb2 as npb
from tessera.sdk.keys import PublicKey
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import parse_der_certificates
from tessera.server.api.authority import CaManagerAuthority
from tessera.server.api.node import NodeServicer, NodeSettings, _check_csrs
from tessera.server.ca.journal import MemoryJournalStore
from tessera.server.ca.keymanager import MemoryKeyManager
from tessera.server.ca.manager import CaManager
from tessera.server.ca.revocation import authority_key_id
from tessera.server.datastore import RegistrationEntry, Selector, open_datastore

AGENT = f"spiffe://{TD}/tessera/agent/join_token/signing-test"


class RotatingAuthority(CaManagerAuthority):
    """Forces a CA rotation after the second signature, in the middle of a batch."""

    def __init__(self, manager: CaManager) -> None:
        super().__init__(manager)
        self.count = 0

    def sign_x509_svid(self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: float, dns_names=()):  # type: ignore[no-untyped-def]
        chain = super().sign_x509_svid(public_key, spiffe_id, ttl, dns_names)
        self.count += 1
        if self.count == 2:
            self.manager.prepare()
            self.manager.activate()
        return chain


def _sign(tmp_path: Path, rotate: bool) -> tuple[list[str], list[str]]:
    ds = open_datastore(None, data_dir=tmp_path)
    manager = CaManager(TD, MemoryKeyManager(), MemoryJournalStore())
    manager.load()
    manager.tick()
    authority = RotatingAuthority(manager) if rotate else CaManagerAuthority(manager)
    servicer = NodeServicer(
        settings=NodeSettings(TrustDomain(TD), 3600, 3600, 300),
        datastore=ds,
        authority=authority,
        attestors={},
        peers=None,  # type: ignore[arg-type]  # _sign_batch never looks at peers
    )
    entries = {
        f"e{i}": RegistrationEntry(
            id=f"e{i}", spiffe_id=f"spiffe://{TD}/w{i}", parent_id=AGENT, selectors=(Selector("unix", f"uid:{i}"),)
        )
        for i in range(4)
    }
    requests = [npb.X509SignRequest(entry_id=f"e{i}", csr=csr_der(ec_key())) for i in range(4)]
    results = servicer._sign_batch(AGENT, requests, _check_csrs(requests), entries)
    signers = [authority_key_id(parse_der_certificates(r.cert_chain)[0]) for r in results]
    recorded = {s.serial: s.issuer_key_id for s in ds.list_issued_svids(agent_id=AGENT)}
    serials = [format(parse_der_certificates(r.cert_chain)[0].serial_number, "x") for r in results]
    ds.close()
    return signers, [recorded[s] for s in serials]


def test_every_signed_svid_is_recorded_with_its_issuer(tmp_path: Path) -> None:
    signers, recorded = _sign(tmp_path, rotate=False)
    assert recorded == signers and len(set(signers)) == 1


def test_a_rotation_in_the_middle_of_a_batch_records_the_real_issuers(tmp_path: Path) -> None:
    signers, recorded = _sign(tmp_path, rotate=True)
    assert len(set(signers)) == 2  # the batch really straddled a rotation
    assert recorded == signers
