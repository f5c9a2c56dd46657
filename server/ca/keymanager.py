"""Where the CA's private keys live.

The CA manager only ever talks to the :class:`KeyManager` protocol: it asks for a key in a named slot,
signs with the handle it gets back, and deletes the slot when the authority is pruned. That keeps the
rotation logic independent of key storage, so a PKCS#11/HSM key manager (whose handles sign without the
private key ever leaving the device) can be added later without touching the CA manager.

:class:`DiskKeyManager` is the default: one PKCS#8 PEM file per slot, mode 0600, in a 0700 directory,
written atomically so a crash never leaves a truncated key behind.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tessera.sdk.keys import KEY_KINDS, PrivateKey, PublicKey, generate_key, key_kind
from tessera.server.ca._files import ensure_private_dir, fsync_dir, write_private_file
from tessera.server.errors import KeyManagerError

DEFAULT_KEY_KIND = "ec-p256"
"""The default kind of CA and JWT signing keys, as in SPIRE. Any kind of ``tessera.sdk.keys.KEY_KINDS`` works."""

_SLOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_SUFFIX = ".key.pem"


def check_key_kind(kind: str) -> str:
    """Returns ``kind`` if it is a supported CA key kind, else raises ValueError naming the choices."""
    if kind not in KEY_KINDS:
        raise ValueError(f"unsupported CA key kind {kind!r}; choose one of {', '.join(KEY_KINDS)}")
    return kind


def check_slot_id(slot_id: str) -> str:
    """Slot ids become file names (and HSM labels): refuse anything that could escape the key directory."""
    if not _SLOT_ID.match(slot_id):
        raise KeyManagerError(f"invalid key slot id {slot_id!r}: use 1-128 characters of A-Z, a-z, 0-9, '_', '-'")
    return slot_id


class SigningKey(Protocol):
    """A handle on a CA key: enough to sign certificates and JWTs and to publish the public half."""

    @property
    def slot_id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def public_key(self) -> PublicKey: ...

    @property
    def signer(self) -> PrivateKey:
        """An object ``cryptography``'s certificate builders and PyJWT can sign with.

        For keys at rest this is the private key itself; an HSM implementation returns a subclass of the
        matching ``cryptography`` private-key ABC whose ``sign`` calls the device.
        """
        ...


class KeyManager(Protocol):
    """Stores CA keys by slot id. Implementations must be safe to call from several threads."""

    def generate(self, slot_id: str, kind: str) -> SigningKey:
        """Creates a fresh key of ``kind`` in ``slot_id`` (replacing any key there) and persists it."""
        ...

    def load(self, slot_id: str) -> SigningKey | None:
        """Returns the key stored in ``slot_id``, or None when the slot is empty."""
        ...

    def delete(self, slot_id: str) -> None:
        """Destroys the key in ``slot_id``; deleting an empty slot is not an error."""
        ...

    def slot_ids(self) -> list[str]:
        """Lists the occupied slots (the CA manager uses it to clean up keys a crash left unreferenced)."""
        ...


@dataclass(frozen=True, slots=True)
class LocalSigningKey:
    """A key held in process memory (loaded from disk or generated in memory)."""

    slot_id: str
    kind: str
    private_key: PrivateKey

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def signer(self) -> PrivateKey:
        return self.private_key

    def __repr__(self) -> str:  # never let a key reach a log line through repr()
        return f"LocalSigningKey(slot_id={self.slot_id!r}, kind={self.kind!r})"


def _generate(kind: str) -> PrivateKey:
    return generate_key(check_key_kind(kind))


class DiskKeyManager:
    """Keys at rest: ``<directory>/<slot_id>.key.pem`` (PKCS#8 PEM, unencrypted, 0600; directory 0700).

    The directory belongs to this key manager: :meth:`slot_ids` lists every ``*.key.pem`` file in it.
    """

    def __init__(self, directory: Path | str) -> None:
        self._dir = Path(directory)

    @property
    def directory(self) -> Path:
        return self._dir

    def _path(self, slot_id: str) -> Path:
        return self._dir / f"{check_slot_id(slot_id)}{_SUFFIX}"

    def generate(self, slot_id: str, kind: str) -> SigningKey:
        path = self._path(slot_id)
        key = _generate(kind)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            ensure_private_dir(self._dir)
            write_private_file(path, pem)
        except OSError as exc:
            raise KeyManagerError(f"cannot store CA key {slot_id!r} in {self._dir}: {exc.strerror or exc}") from exc
        return LocalSigningKey(slot_id, kind, key)

    def load(self, slot_id: str) -> SigningKey | None:
        path = self._path(slot_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyManagerError(f"cannot read CA key file {path}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "rb") as fh:
            if os.fstat(fh.fileno()).st_mode & 0o077:
                # Keys are written 0600; anything wider means someone changed it. Tighten rather than refuse:
                # refusing would rotate the CA on restart, which is the worse outcome.
                os.fchmod(fh.fileno(), 0o600)
            data = fh.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyManagerError(f"CA key file {path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeyManagerError(f"CA key file {path} holds an unsupported key type {type(key).__name__}")
        return LocalSigningKey(slot_id, key_kind(key), key)

    def delete(self, slot_id: str) -> None:
        path = self._path(slot_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise KeyManagerError(f"cannot delete CA key file {path}: {exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):
            fsync_dir(self._dir)

    def slot_ids(self) -> list[str]:
        try:
            names: Iterable[str] = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyManagerError(f"cannot list CA key directory {self._dir}: {exc.strerror or exc}") from exc
        slots = []
        for name in names:
            if name.endswith(_SUFFIX) and not name.startswith("."):
                slot = name[: -len(_SUFFIX)]
                if _SLOT_ID.match(slot):
                    slots.append(slot)
        return sorted(slots)


class MemoryKeyManager:
    """Keys that live only as long as the process: for tests, benchmarks and throw-away servers."""

    def __init__(self) -> None:
        self._keys: dict[str, LocalSigningKey] = {}

    def generate(self, slot_id: str, kind: str) -> SigningKey:
        handle = LocalSigningKey(check_slot_id(slot_id), kind, _generate(kind))
        self._keys[slot_id] = handle
        return handle

    def load(self, slot_id: str) -> SigningKey | None:
        return self._keys.get(check_slot_id(slot_id))

    def delete(self, slot_id: str) -> None:
        self._keys.pop(check_slot_id(slot_id), None)

    def slot_ids(self) -> list[str]:
        return sorted(self._keys)
