"""An upstream authority: an organisation's existing CA (root or intermediate) given as files.

With one configured, the server's CAs are intermediates signed by it, the trust bundle holds the upstream
root(s) instead of the server's own CAs, and every SVID's chain carries the server's intermediate plus any
upstream intermediates up to (not including) a root. Relying parties then keep trusting the organisation's
root across every server CA rotation.

Everything is checked when the files are loaded, so a wrong key, a non-CA certificate or a chain that does
not reach the given roots stops start-up with one clear line instead of producing unverifiable SVIDs later.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.sdk.errors import SvidError
from tessera.sdk.keys import PrivateKey, as_private_key, public_keys_equal
from tessera.sdk.svid import parse_pem_certificates
from tessera.sdk.x509profile import check_signing_certificate
from tessera.server.ca.slots import issued_by, self_signed
from tessera.server.errors import UpstreamAuthorityError


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _describe(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string() or "<empty subject>")


@dataclass(frozen=True, slots=True)
class UpstreamAuthority:
    """A checked upstream CA: use :meth:`load` (files) or :meth:`create` (objects), not the constructor.

    ``chain`` is what the server hands out above its own intermediate: the upstream signing certificate
    and any further intermediates, excluding every certificate that is itself one of the ``roots``.
    """

    certificate: x509.Certificate
    signer: PrivateKey
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    def __repr__(self) -> str:  # keep the key out of logs
        return f"UpstreamAuthority(certificate={_describe(self.certificate)}, roots={len(self.roots)})"

    @property
    def not_after(self) -> datetime:
        """The end of the upstream chain's validity: no server CA it signs can outlive it."""
        return min(c.not_valid_after_utc for c in (self.certificate, *self.chain, *self.roots))

    @classmethod
    def create(
        cls,
        certificate: x509.Certificate,
        private_key: PrivateKey,
        chain: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate] = (),
    ) -> UpstreamAuthority:
        """Checks and assembles an upstream authority.

        ``chain`` are the certificates above ``certificate`` (its issuer first); ``roots`` the trust
        anchors. Without roots the top of the chain (or ``certificate`` itself) must be self-signed and
        becomes the only root.
        """
        check_signing_certificate(certificate, error=UpstreamAuthorityError, what="upstream certificate")
        if not public_keys_equal(private_key.public_key(), certificate.public_key()):  # type: ignore[arg-type]
            raise UpstreamAuthorityError(
                f"upstream private key does not belong to the upstream certificate {_describe(certificate)}"
            )
        path = [certificate, *chain]
        for lower, upper in itertools.pairwise(path):
            if not issued_by(lower, upper):
                raise UpstreamAuthorityError(
                    f"upstream chain is out of order: {_describe(lower)} is not signed by {_describe(upper)}"
                )
        root_list = list(roots)
        if not root_list:
            top = path[-1]
            if not self_signed(top):
                raise UpstreamAuthorityError(
                    f"upstream certificate chain ends at {_describe(top)}, which is not self-signed: "
                    "give the upstream root certificate(s) as the upstream bundle"
                )
            root_list = [top]
        root_ders = {_der(r) for r in root_list}
        handed_out = [c for c in path if _der(c) not in root_ders]
        top = path[-1]
        if _der(top) not in root_ders and not any(issued_by(top, r) for r in root_list):
            raise UpstreamAuthorityError(
                f"upstream chain does not reach the upstream bundle: {_describe(top)} is not signed by any of its "
                f"{len(root_list)} root(s)"
            )
        for cert in handed_out[1:]:
            check_signing_certificate(cert, error=UpstreamAuthorityError, what="upstream intermediate")
        return cls(certificate, private_key, tuple(handed_out), tuple(root_list))

    @classmethod
    def load(
        cls, cert_path: Path | str, key_path: Path | str, bundle_path: Path | str | None = None
    ) -> UpstreamAuthority:
        """Loads the upstream CA from PEM files.

        ``cert_path``: the upstream CA certificate first, optionally followed by its issuers. ``key_path``:
        its unencrypted PEM private key. ``bundle_path``: the upstream root(s); needed when the
        certificate file does not end in a self-signed root.
        """
        certs = _read_certificates(Path(cert_path), "upstream certificate")
        roots = _read_certificates(Path(bundle_path), "upstream bundle") if bundle_path is not None else []
        key_file = Path(key_path)
        try:
            key_pem = key_file.read_bytes()
        except OSError as exc:
            raise UpstreamAuthorityError(f"cannot read upstream key file {key_file}: {exc.strerror or exc}") from None
        try:
            key = as_private_key(serialization.load_pem_private_key(key_pem, password=None))
        except (ValueError, TypeError, SvidError) as exc:
            raise UpstreamAuthorityError(
                f"upstream key file {key_file} is not an unencrypted PEM EC/RSA private key: {exc}"
            ) from None
        return cls.create(certs[0], key, certs[1:], roots)

    def check_usable(self, now: datetime) -> None:
        """Raises :class:`UpstreamAuthorityError` when the upstream chain cannot sign a CA valid at ``now``."""
        for cert in (self.certificate, *self.chain):
            if now >= cert.not_valid_after_utc:
                raise UpstreamAuthorityError(
                    f"upstream certificate {_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()}; "
                    "renew it to keep signing"
                )
            if now < cert.not_valid_before_utc:
                raise UpstreamAuthorityError(
                    f"upstream certificate {_describe(cert)} is not valid before "
                    f"{cert.not_valid_before_utc.isoformat()}"
                )

    def anchors(self, certificate: x509.Certificate, issuer_chain: Sequence[x509.Certificate]) -> bool:
        """True when ``certificate`` (with ``issuer_chain`` above it) chains to one of this authority's roots.

        Used on restart: a server CA restored from the journal is only kept if the configured upstream still
        vouches for it (the operator may have switched upstream authorities).
        """
        path = [certificate, *issuer_chain]
        for lower, upper in itertools.pairwise(path):
            if not issued_by(lower, upper):
                return False
        return any(issued_by(path[-1], root) for root in self.roots)


def _read_certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UpstreamAuthorityError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    try:
        certs = parse_pem_certificates(data)
    except SvidError as exc:
        raise UpstreamAuthorityError(f"{what} file {path}: {exc}") from None
    if not certs:
        raise UpstreamAuthorityError(f"{what} file {path} holds no PEM certificate")
    return certs
