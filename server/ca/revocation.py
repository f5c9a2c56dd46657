"""Revocation: remembering what was signed, revoking single SVIDs, publishing CRLs, and deciding when a tainted
CA can be revoked.

The node API records every X509-SVID it signs (:func:`issued_svid`); ``x509 revoke --entry-id/--agent`` turns
those records into serials on the CRL of the CA that signed them (:func:`revoke_x509_svids`).
:class:`CrlPublisher` (driven by the server's maintenance loop) signs one CRL per held CA and stores them in the
datastore with a bundles-revision bump, so agents receive them with the bundles and hand them to workloads.

The rule for revoking a tainted CA (:func:`pending_reissue`): refused while some unexpired SVID it signed is
still *in use*, i.e. its entry (or, for an agent SVID, its agent) still exists, it is not itself on a CRL, and
no later SVID for the same entry and agent was signed by another CA. Once agents have re-issued everything
(which tainting asks them to do at their next sync), the list is empty and revoking is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from tessera.server.ca.crl import DEFAULT_CRL_VALIDITY, RevokedSerial, build_crl, crl_der, serial_hex
from tessera.server.ca.manager import CaManager
from tessera.server.datastore.base import Crl, Datastore, IssuedSvid, RevokedCertificate
from tessera.server.errors import NotFound

log = logging.getLogger("tessera.server.ca.revocation")


def authority_key_id(cert: x509.Certificate) -> str:
    """Hex AKI of a certificate (the SKI of the CA that signed it), "" when absent."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return ""
    return aki.hex() if aki else ""


def issued_svid(chain: Sequence[x509.Certificate], entry_id: str, agent_id: str) -> IssuedSvid:
    """The record of a freshly signed chain (leaf first)."""
    leaf = chain[0]
    return IssuedSvid(
        serial=serial_hex(leaf.serial_number),
        issuer_key_id=authority_key_id(leaf),
        spiffe_id=_uri(leaf),
        entry_id=entry_id,
        agent_id=agent_id,
        issued_at=int(leaf.not_valid_before_utc.timestamp()),
        expires_at=int(leaf.not_valid_after_utc.timestamp()),
    )


def _uri(cert: x509.Certificate) -> str:
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        return ""
    return uris[0] if uris else ""


# ---------------------------------------------------------------------------------------------- revoking


@dataclass(frozen=True, slots=True)
class RevocationTarget:
    """Exactly one of these is set."""

    serial: str = ""
    entry_id: str = ""
    agent_id: str = ""


def revoke_x509_svids(ds: Datastore, target: RevocationTarget, now: int) -> list[RevokedCertificate]:
    """Puts the target's unexpired SVIDs on the CRL; returns what was newly revoked.

    Raises NotFound when the serial, entry or agent has no unexpired SVID the server knows of.
    """
    if target.serial:
        found = ds.list_issued_svids(serial=target.serial, unexpired_at=now)
        what = f"serial {target.serial}"
    elif target.entry_id:
        found = ds.list_issued_svids(entry_id=target.entry_id, unexpired_at=now)
        what = f"entry {target.entry_id}"
    elif target.agent_id:
        found = ds.list_issued_svids(agent_id=target.agent_id, unexpired_at=now)
        what = f"agent {target.agent_id}"
    else:
        raise ValueError("give a serial, an entry id or an agent id")
    if not found:
        raise NotFound(f"no unexpired X509-SVID issued by this server for {what}")
    added = ds.revoke_certificates(
        [RevokedCertificate(s.serial, s.issuer_key_id, s.spiffe_id, s.expires_at, now) for s in found]
    )
    for item in added:
        extra = {"serial": item.serial, "spiffe_id": item.spiffe_id, "issuer": item.issuer_key_id}
        log.warning("X509-SVID revoked", extra=extra)
    return added


def pending_reissue(ds: Datastore, issuer_key_id: str, now: int) -> list[IssuedSvid]:
    """Unexpired SVIDs signed by ``issuer_key_id`` that are still in use (see the module docstring).

    Reads the unexpired issued SVIDs once (an admin operation, not a hot path), so the cost is one scan however
    many SVIDs the authority signed.
    """
    everything = ds.list_issued_svids(unexpired_at=now)
    signed = [s for s in everything if s.issuer_key_id == issuer_key_id]
    if not signed:
        return []
    # The latest SVID signed by another CA for each (entry, agent): what replaced the tainted one.
    replaced: dict[tuple[str, str], int] = {}
    for other in everything:
        if other.issuer_key_id != issuer_key_id:
            key = (other.entry_id, other.agent_id)
            replaced[key] = max(replaced.get(key, other.issued_at), other.issued_at)
    revoked = {r.serial for r in ds.list_revoked_certificates(unexpired_at=now)}
    entries = ds.get_entries(sorted({s.entry_id for s in signed if s.entry_id}))
    agents: dict[str, bool] = {}
    pending: list[IssuedSvid] = []
    for svid in signed:
        if svid.serial in revoked:
            continue
        if svid.entry_id:
            if svid.entry_id not in entries:
                continue  # entry deleted: agents dropped the SVID
        else:
            alive = agents.get(svid.agent_id)
            if alive is None:
                try:
                    alive = not ds.get_agent(svid.agent_id).banned
                except NotFound:
                    alive = False
                agents[svid.agent_id] = alive
            if not alive:
                continue
        newer = replaced.get((svid.entry_id, svid.agent_id))
        if newer is not None and newer >= svid.issued_at:
            continue
        pending.append(svid)
    return pending


# ---------------------------------------------------------------------------------------------- CRLs


class CrlPublisher:
    """Keeps one signed CRL per held X.509 CA in the datastore. Call :meth:`publish` from the maintenance loop:
    it re-signs when the CAs or the revoked serials changed, or when half the CRL validity has passed."""

    def __init__(self, ca: CaManager, datastore: Datastore, validity: timedelta = DEFAULT_CRL_VALIDITY) -> None:
        self._ca = ca
        self._ds = datastore
        self._validity = validity
        self._state: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._resign_at: datetime | None = None

    def publish(self, now: datetime | None = None, *, force: bool = False) -> bool:
        """Returns True when CRLs were written."""
        now = now or datetime.now(UTC)
        unix = int(now.timestamp())
        authorities = self._ca.held_x509_authorities()
        revoked = self._ds.list_revoked_certificates(unexpired_at=unix)
        state = (tuple(a.authority_id for a in authorities), tuple(f"{r.issuer_key_id}/{r.serial}" for r in revoked))
        due = self._resign_at is None or now >= self._resign_at
        if not force and not due and state == self._state:
            return False
        by_issuer: dict[str, list[RevokedSerial]] = {}
        for r in revoked:
            by_issuer.setdefault(r.issuer_key_id, []).append(
                RevokedSerial(int(r.serial, 16), datetime.fromtimestamp(r.revoked_at, UTC))
            )
        crls = [
            Crl(
                a.authority_id,
                crl_der(
                    build_crl(
                        issuer_cert=a.certificate,
                        issuer_key=a.key.signer,
                        revoked=by_issuer.get(a.authority_id, ()),
                        now=now,
                        validity=self._validity,
                        backdate=self._ca.config.backdate,
                    )
                ),
                unix + int(self._validity.total_seconds()),
                unix,
            )
            for a in authorities
        ]
        held = {a.authority_id for a in authorities}
        stale = [c.issuer_key_id for c in self._ds.list_crls() if c.issuer_key_id not in held and c.next_update <= unix]
        self._ds.set_crls(crls, delete_issuers=stale)
        self._state = state
        self._resign_at = now + self._validity / 2
        log.info("CRLs published", extra={"authorities": len(crls), "revoked": len(revoked)})
        return True


__all__ = [
    "CrlPublisher",
    "RevocationTarget",
    "authority_key_id",
    "issued_svid",
    "pending_reissue",
    "revoke_x509_svids",
]
