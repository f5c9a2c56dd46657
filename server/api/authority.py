"""What the node API needs from the certificate authority, as one narrow interface.

The node API signs and publishes through this protocol only, so it can be tested against any CA and the CA can
change its internals freely. :class:`CaManagerAuthority` adapts the server's CA (the manager that rotates and
the CA that signs); the operator's ``ca`` commands work on the manager itself (:mod:`tessera.server.api.ca_admin`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Protocol

from cryptography import x509

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.keys import PublicKey
from tessera.sdk.spiffeid import SpiffeId
from tessera.server.ca.manager import CaManager


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

    def active_x509_authority_id(self) -> str | None:
        """Authority ID (hex SKI) of the X.509 CA signing right now (None when none is active)."""
        ...

    def tainted_x509_authority_ids(self) -> list[str]:
        """Authority IDs of X.509 CAs marked tainted (SVIDs they signed must be re-issued)."""
        ...


class CaManagerAuthority:
    """Adapts :class:`tessera.server.ca.manager.CaManager` (and the CA that signs it drives) to :class:`Authority`."""

    def __init__(self, manager: CaManager, bundle: Callable[[], SpiffeBundle] | None = None) -> None:
        """``bundle`` gives the trust domain's published bundle (all servers' authorities); default: this
        server's own."""
        self.manager = manager
        self._bundle = bundle or manager.bundle

    def sign_x509_svid(
        self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: float, dns_names: Sequence[str] = ()
    ) -> list[x509.Certificate]:
        return self.manager.ca.sign_x509_svid(public_key, spiffe_id, ttl, dns_names=dns_names)

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: float) -> tuple[str, dt.datetime]:
        return self.manager.ca.mint_jwt_svid(spiffe_id, list(audience), ttl)

    def trust_bundle(self) -> SpiffeBundle:
        return self._bundle()

    def active_x509_authority_id(self) -> str | None:
        active = self.manager.ca.active.x509
        return active.authority_id if active is not None else None

    def tainted_x509_authority_ids(self) -> list[str]:
        return [a.authority_id for a in self.manager.authorities() if a.kind == "x509" and a.tainted]
