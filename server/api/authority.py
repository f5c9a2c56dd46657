"""What the APIs need from the certificate authority, as one narrow interface.

The node and admin APIs sign and publish through this protocol only, so they can be tested against any CA
and the CA manager can change its internals freely. :class:`tessera.server.app` adapts the CA manager.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.keys import PublicKey
from tessera.sdk.spiffeid import SpiffeId
from tessera.server.ca.manager import CaManager


@dataclass(frozen=True, slots=True)
class SlotInfo:
    kind: str  # "x509" or "jwt"
    state: str  # "active", "prepared", "old"
    key_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str = ""
    tainted: bool = False


class Authority(Protocol):
    def sign_x509_svid(
        self,
        public_key: PublicKey,
        spiffe_id: SpiffeId,
        ttl: float,
        dns_names: Sequence[str] = (),
    ) -> list[x509.Certificate]:
        """Leaf first, then any intermediates up to (not including) a bundle root. Thread-safe."""
        ...

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: float) -> tuple[str, dt.datetime]:
        """The compact JWS and its expiry."""
        ...

    def trust_bundle(self) -> SpiffeBundle:
        """This trust domain's bundle: X.509 roots (own CAs or the upstream root) and JWT keys."""
        ...

    def active_x509_key_id(self) -> str | None:
        """Hex SKI of the X.509 CA signing right now (None when none is active)."""
        ...

    def tainted_key_ids(self) -> list[str]:
        """Hex SKIs of X.509 authorities marked tainted (SVIDs they signed must be re-issued)."""
        ...

    def slots(self) -> list[SlotInfo]: ...

    def prepare(self) -> None: ...

    def activate(self) -> None: ...


class CaManagerAuthority:
    """Adapts :class:`tessera.server.ca.manager.CaManager` to :class:`Authority`."""

    def __init__(self, manager: CaManager, bundle: Callable[[], SpiffeBundle] | None = None) -> None:
        """``bundle`` gives the trust domain's published bundle (all servers' authorities); default: this
        server's own."""
        self.manager = manager
        self._bundle = bundle or manager.bundle

    def sign_x509_svid(
        self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: float, dns_names: Sequence[str] = ()
    ) -> list[x509.Certificate]:
        return self.manager.sign_x509_svid(public_key, spiffe_id, ttl, dns_names=dns_names)

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: float) -> tuple[str, dt.datetime]:
        return self.manager.mint_jwt_svid(spiffe_id, list(audience), ttl)

    def trust_bundle(self) -> SpiffeBundle:
        return self._bundle()

    def active_x509_key_id(self) -> str | None:
        active = self.manager.active_x509_authority
        return active.key_id if active is not None else None

    def tainted_key_ids(self) -> list[str]:
        return [a.id for a in self.manager.authorities() if a.kind == "x509" and a.tainted]

    def slots(self) -> list[SlotInfo]:
        return [
            SlotInfo(
                kind=a.kind,
                state=str(a.status),
                key_id=a.id,
                not_before=a.not_before,
                not_after=a.not_after,
                key_type=a.key_kind,
                tainted=a.tainted,
            )
            for a in self.manager.authorities()
        ]

    def prepare(self) -> None:
        self.manager.prepare()

    def activate(self) -> None:
        self.manager.activate()
