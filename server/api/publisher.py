"""Publishing this server's authorities into the trust domain's bundle, which several servers may share.

With one datastore shared by several servers (PostgreSQL, high availability) each server holds its own CA
and JWT keys, and the trust domain's one bundle must hold all of them, or an agent attested by one server
could not reach another. So a server never overwrites the bundle with its own authorities: it merges them
in, keeps the other servers' (dropping X.509 authorities that have expired), and removes only what it
published itself and no longer holds. The write is a compare-and-set on the bundle's revision, retried when
another server wrote in between. Which authorities this server published is remembered in a small state
file in its data dir, so a restart still removes its own retired authorities.

Known limit: a server that leaves for good (its data dir gone) cannot remove its JWT keys (JWKs carry no
expiry); its X.509 authorities leave the bundle when they expire.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.files import write_private_file
from tessera.sdk.keys import PublicKey, public_key_der
from tessera.sdk.spiffeid import TrustDomain
from tessera.server.datastore.base import Datastore
from tessera.server.errors import NotFound, RevisionConflictError

log = logging.getLogger("tessera.server.bundle")

MAX_ATTEMPTS = 20


def _x509_id(cert: x509.Certificate) -> str:
    return "x509:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _jwt_id(kid: str) -> str:
    return "jwt:" + kid


def authority_ids(bundle: SpiffeBundle) -> set[str]:
    return {_x509_id(c) for c in bundle.x509_authorities} | {_jwt_id(k) for k in bundle.jwt_authorities}


def same_authorities(a: SpiffeBundle, b: SpiffeBundle) -> bool:
    return authority_ids(a) == authority_ids(b) and _jwk_ders(a.jwt_authorities) == _jwk_ders(b.jwt_authorities)


def _jwk_ders(keys: Mapping[str, PublicKey]) -> dict[str, bytes]:
    return {kid: public_key_der(key) for kid, key in keys.items()}


def merge(mine: SpiffeBundle, stored: SpiffeBundle | None, retired: Iterable[str], now: dt.datetime) -> SpiffeBundle:
    """Pure: ``mine`` plus the other servers' still-valid authorities from ``stored``, minus ``retired``."""
    drop = authority_ids(mine) | set(retired)
    x509_authorities = list(mine.x509_authorities)
    jwt_authorities: dict[str, PublicKey] = {}
    sequence = mine.sequence
    if stored is not None:
        x509_authorities += [
            c for c in stored.x509_authorities if _x509_id(c) not in drop and c.not_valid_after_utc > now
        ]
        jwt_authorities = {k: v for k, v in stored.jwt_authorities.items() if _jwt_id(k) not in drop}
        sequence = max(sequence, stored.sequence + 1)
    jwt_authorities.update(mine.jwt_authorities)
    return SpiffeBundle(mine.trust_domain, tuple(x509_authorities), jwt_authorities, sequence, mine.refresh_hint)


class BundlePublisher:
    def __init__(self, datastore: Datastore, trust_domain: TrustDomain, state_path: Path) -> None:
        self._ds = datastore
        self._td = trust_domain
        self._state_path = state_path
        self._lock = threading.Lock()
        self._published: set[str] = self._load_state()

    def _load_state(self) -> set[str]:
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self._state_path, exc)
            return set()
        return {str(i) for i in data.get("published", [])} if isinstance(data, dict) else set()

    def _save_state(self, published: set[str]) -> None:
        write_private_file(self._state_path, json.dumps({"published": sorted(published)}).encode())
        self._published = published

    def stored(self) -> tuple[SpiffeBundle | None, int]:
        """The trust domain's bundle as stored (None when there is none yet) and its revision (0 if none)."""
        try:
            record = self._ds.get_bundle(self._td.name)
        except NotFound:
            return None, 0
        return SpiffeBundle.from_document(self._td, record.document), record.revision

    def publish(self, mine: SpiffeBundle, now: dt.datetime) -> SpiffeBundle:
        """Merges ``mine`` into the stored bundle (compare-and-set, retried); returns the bundle now stored."""
        with self._lock:
            ours = authority_ids(mine)
            retired = self._published - ours
            # Remember everything that may be in the store as ours before writing, so a crash between the
            # write and the next save cannot leave an authority nobody will remove.
            self._save_state(self._published | ours)
            for _ in range(MAX_ATTEMPTS):
                stored, revision = self.stored()
                merged = merge(mine, stored, retired, now)
                if stored is not None and same_authorities(stored, merged):
                    result = stored
                    break
                try:
                    self._ds.set_bundle(self._td.name, merged.to_document(), expected_revision=revision)
                except RevisionConflictError:
                    continue  # another server wrote in between: merge again with what it wrote
                log.info(
                    "trust bundle published",
                    extra={"x509_authorities": len(merged.x509_authorities), "sequence": merged.sequence},
                )
                result = merged
                break
            else:
                raise RevisionConflictError(f"could not publish the trust bundle after {MAX_ATTEMPTS} attempts")
            self._save_state(ours)
            return result
