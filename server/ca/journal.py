"""The CA journal: which authorities exist, in which slot, and the bundle's sequence number.

It is what lets a restarted server carry on with the same active CA (and rotate nothing early): the
certificates and JWT public keys are recorded here, the private keys stay with the key manager under the
recorded slot ids. The journal holds no secret, but it is written 0600 like everything in the data dir.

The bytes go through a :class:`JournalStore` so the same document can live in a file (the default) or in
the datastore (several servers sharing one database), without the CA manager knowing which.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.sdk.errors import SvidError
from tessera.sdk.keys import PublicKey, load_public_key_der, public_key_der
from tessera.server.ca._files import ensure_private_dir, write_private_file
from tessera.server.errors import CaJournalError

JOURNAL_VERSION = 1


class Status(StrEnum):
    """The slot an authority is in."""

    PREPARED = "prepared"
    """Published in the bundle, not signing yet."""
    ACTIVE = "active"
    """Signs everything issued now."""
    OLD = "old"
    """Retired from signing, kept in the bundle until it expires so what it signed still verifies."""


class JournalStore(Protocol):
    """Where the journal's bytes live."""

    def load(self) -> bytes | None:
        """The last saved journal, or None if none was ever saved."""
        ...

    def save(self, data: bytes) -> None:
        """Replaces the journal atomically (a reader sees the old or the new document, never a mix)."""
        ...


class FileJournalStore:
    """The journal as one JSON file, replaced atomically on every save (mode 0600, directory 0700)."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> bytes | None:
        try:
            return self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CaJournalError(f"cannot read CA journal {self._path}: {exc.strerror or exc}") from None

    def save(self, data: bytes) -> None:
        try:
            ensure_private_dir(self._path.parent)
            write_private_file(self._path, data)
        except OSError as exc:
            raise CaJournalError(f"cannot write CA journal {self._path}: {exc.strerror or exc}") from None


class MemoryJournalStore:
    """A journal kept in memory (tests, benchmarks, throw-away servers)."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = data


@dataclass(frozen=True, slots=True)
class X509Record:
    slot_id: str
    status: Status
    certificate: x509.Certificate
    issuer_chain: tuple[x509.Certificate, ...]
    """Certificates between this CA and a bundle root (the upstream chain); empty for a self-signed root."""
    tainted: bool = False


@dataclass(frozen=True, slots=True)
class JwtRecord:
    slot_id: str
    status: Status
    authority_id: str
    """The key's authority ID, which tokens carry as ``kid`` (the document's field keeps that name)."""
    public_key: PublicKey
    not_before: datetime
    not_after: datetime
    tainted: bool = False


@dataclass(frozen=True, slots=True)
class Journal:
    trust_domain: str
    x509: tuple[X509Record, ...] = ()
    jwt: tuple[JwtRecord, ...] = ()
    bundle_sequence: int = 0
    bundle_digest: str = ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _cert_b64(cert: x509.Certificate) -> str:
    return _b64(cert.public_bytes(serialization.Encoding.DER))


def _time(value: datetime) -> int:
    return int(value.timestamp())


def encode(journal: Journal) -> bytes:
    doc = {
        "version": JOURNAL_VERSION,
        "trust_domain": journal.trust_domain,
        "x509": [
            {
                "slot_id": r.slot_id,
                "status": r.status.value,
                "certificate": _cert_b64(r.certificate),
                "issuer_chain": [_cert_b64(c) for c in r.issuer_chain],
                "tainted": r.tainted,
            }
            for r in journal.x509
        ],
        "jwt": [
            {
                "slot_id": r.slot_id,
                "status": r.status.value,
                "kid": r.authority_id,
                "public_key": _b64(public_key_der(r.public_key)),
                "not_before": _time(r.not_before),
                "not_after": _time(r.not_after),
                "tainted": r.tainted,
            }
            for r in journal.jwt
        ],
        "bundle": {"sequence": journal.bundle_sequence, "digest": journal.bundle_digest},
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


class _Reader:
    """Typed access to the decoded JSON that turns every surprise into one CaJournalError line."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, message: str) -> CaJournalError:
        return CaJournalError(f"CA journal is corrupt ({self.where}): {message}")

    def get(self, obj: Any, key: str, kind: type[Any]) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(f"missing {key!r}")
        value = obj[key]
        if kind is int and isinstance(value, bool):
            raise self.fail(f"{key!r} must be an integer")
        if not isinstance(value, kind):
            raise self.fail(f"{key!r} must be of type {kind.__name__}")
        return value

    def status(self, obj: Any) -> Status:
        value = self.get(obj, "status", str)
        try:
            return Status(value)
        except ValueError:
            raise self.fail(f"unknown status {value!r}") from None

    def der(self, text: Any, what: str) -> bytes:
        if not isinstance(text, str):
            raise self.fail(f"{what} must be a base64 string")
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:
            raise self.fail(f"{what} is not valid base64") from None

    def certificate(self, text: Any, what: str) -> x509.Certificate:
        try:
            return x509.load_der_x509_certificate(self.der(text, what))
        except ValueError:
            raise self.fail(f"{what} is not a DER certificate") from None

    def time(self, obj: Any, key: str) -> datetime:
        value = self.get(obj, key, int)
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise self.fail(f"{key!r} is out of range") from None


def decode(data: bytes) -> Journal:
    """Parses a journal document; raises :class:`CaJournalError` with the first problem found."""
    reader = _Reader("document")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise reader.fail(f"not JSON: {exc}") from None
    version = reader.get(doc, "version", int)
    if version != JOURNAL_VERSION:
        raise CaJournalError(
            f"CA journal has version {version}; this server understands version {JOURNAL_VERSION} only"
        )
    trust_domain = reader.get(doc, "trust_domain", str)
    x509_records = []
    for index, item in enumerate(reader.get(doc, "x509", list)):
        r = _Reader(f"x509[{index}]")
        chain: Sequence[Any] = r.get(item, "issuer_chain", list)
        x509_records.append(
            X509Record(
                slot_id=r.get(item, "slot_id", str),
                status=r.status(item),
                certificate=r.certificate(r.get(item, "certificate", str), "certificate"),
                issuer_chain=tuple(r.certificate(c, f"issuer_chain[{i}]") for i, c in enumerate(chain)),
                tainted=r.get(item, "tainted", bool),
            )
        )
    jwt_records = []
    for index, item in enumerate(reader.get(doc, "jwt", list)):
        r = _Reader(f"jwt[{index}]")
        try:
            public_key = load_public_key_der(r.der(r.get(item, "public_key", str), "public_key"))
        except SvidError:
            raise r.fail("public_key is not a DER SubjectPublicKeyInfo") from None
        not_before, not_after = r.time(item, "not_before"), r.time(item, "not_after")
        if not_after <= not_before:
            raise r.fail("not_after is not after not_before")
        jwt_records.append(
            JwtRecord(
                slot_id=r.get(item, "slot_id", str),
                status=r.status(item),
                authority_id=r.get(item, "kid", str),
                public_key=public_key,
                not_before=not_before,
                not_after=not_after,
                tainted=r.get(item, "tainted", bool),
            )
        )
    bundle = reader.get(doc, "bundle", dict)
    sequence = reader.get(bundle, "sequence", int)
    if sequence < 0:
        raise reader.fail("bundle sequence is negative")
    for family, records in (("x509", x509_records), ("jwt", jwt_records)):
        for status in (Status.ACTIVE, Status.PREPARED):
            if sum(1 for rec in records if rec.status is status) > 1:
                raise reader.fail(f"more than one {status.value} {family} authority")
    return Journal(
        trust_domain=trust_domain,
        x509=tuple(x509_records),
        jwt=tuple(jwt_records),
        bundle_sequence=sequence,
        bundle_digest=reader.get(bundle, "digest", str),
    )
