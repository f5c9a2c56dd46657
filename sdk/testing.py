"""A test certificate authority (in the spirit of ``trustme``) for Tessera's tests and for users' tests.

``TestCA`` issues correct X509-SVIDs through the same profile code as the real server CA, and on request
certificates that break exactly one rule, so each verifier rule can be shown to reject the right thing.
Keys are generated in memory; nothing touches the disk. Not for production use.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.sdk.bundle import JwtBundle, SpiffeBundle, X509Bundle
from tessera.sdk.jwtsvid import mint_jwt_svid
from tessera.sdk.keys import PrivateKey, generate_key, key_id, private_key_to_der, private_key_to_pem, signature_hash
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid, certificates_to_der, certificates_to_pem
from tessera.sdk.x509profile import build_ca_certificate, build_x509_svid, subject_key_identifier

#: How far certificates are backdated, as the real CA does, to absorb clock skew between hosts.
BACKDATE = dt.timedelta(seconds=10)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A chain and key that were issued without the profile checks (possibly broken on purpose)."""

    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    def chain_der(self) -> bytes:
        return certificates_to_der(self.cert_chain)

    def chain_pem(self) -> bytes:
        return certificates_to_pem(self.cert_chain)

    def key_der(self) -> bytes:
        return private_key_to_der(self.private_key)

    def key_pem(self) -> bytes:
        return private_key_to_pem(self.private_key)


class TestCA:
    """A root CA for one trust domain (or, from :meth:`issue_intermediate`, an intermediate under one).

    ``now`` fixes the clock used for validity periods (default: the real time at each call).
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        trust_domain: TrustDomain | str = "example.org",
        key_kind: str = "ec-p256",
        *,
        ttl: dt.timedelta = dt.timedelta(days=30),
        now: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        common_name: str = "Tessera Test CA",
    ) -> None:
        self.trust_domain = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        self.key_kind = key_kind
        self._fixed_now = now
        start = now or _now()
        self.key: PrivateKey = generate_key(key_kind)
        self.certificate: x509.Certificate = build_ca_certificate(
            subject_key=self.key,
            issuer_cert=None,
            issuer_key=self.key,
            trust_domain=self.trust_domain,
            # Backdated a day so tests can issue already-expired leaves under a CA that is itself valid.
            not_before=not_before or start - dt.timedelta(days=1),
            not_after=not_after or start + ttl,
            common_name=common_name,
        )
        self.root: TestCA = self
        #: Certificates between an issued leaf and the root (this CA first), sent in SVID chains.
        self.intermediates: tuple[x509.Certificate, ...] = ()
        self._jwt_key: PrivateKey | None = None

    # ----------------------------------------------------------------------------------------------------
    # Time

    def now(self) -> dt.datetime:
        return self._fixed_now or _now()

    # ----------------------------------------------------------------------------------------------------
    # Bundles

    def x509_bundle(self) -> X509Bundle:
        """The bundle to trust: the root certificate of this CA's hierarchy."""
        return X509Bundle(self.trust_domain, (self.root.certificate,))

    @property
    def jwt_key(self) -> PrivateKey:
        """The root's JWT signing key (EC P-256), created on first use."""
        root = self.root
        if root._jwt_key is None:
            root._jwt_key = generate_key("ec-p256")
        return root._jwt_key

    @property
    def jwt_kid(self) -> str:
        return key_id(self.jwt_key.public_key())

    def jwt_bundle(self) -> JwtBundle:
        return JwtBundle(self.trust_domain, {self.jwt_kid: self.jwt_key.public_key()})

    def spiffe_bundle(self, sequence: int = 1, refresh_hint: int | None = 300) -> SpiffeBundle:
        return SpiffeBundle(
            self.trust_domain,
            (self.root.certificate,),
            {self.jwt_kid: self.jwt_key.public_key()},
            sequence=sequence,
            refresh_hint=refresh_hint,
        )

    def mint_jwt_svid(
        self,
        spiffe_id: SpiffeId | str,
        audience: str | Sequence[str],
        ttl: float = 300,
        *,
        issued_at: dt.datetime | None = None,
    ) -> str:
        """A JWT-SVID signed with this trust domain's JWT key (a path is relative to this trust domain)."""
        issued = issued_at or self.now()
        return mint_jwt_svid(
            self.jwt_key, self.jwt_kid, self._sid(spiffe_id), audience, issued + dt.timedelta(seconds=ttl), issued
        )

    # ----------------------------------------------------------------------------------------------------
    # Issuing

    def _sid(self, spiffe_id: SpiffeId | str) -> SpiffeId:
        if isinstance(spiffe_id, SpiffeId):
            return spiffe_id
        if spiffe_id.startswith("/"):
            return SpiffeId(self.trust_domain, spiffe_id)
        return SpiffeId.parse(spiffe_id)

    def issue_svid(
        self,
        spiffe_id: SpiffeId | str,
        ttl: float = 3600,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        *,
        key_kind: str = "ec-p256",
        private_key: PrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        hint: str = "",
    ) -> X509Svid:
        """A correct X509-SVID (a path like ``"/web"`` is taken as relative to this trust domain)."""
        sid = self._sid(spiffe_id)
        key = private_key or generate_key(key_kind)
        now = self.now()
        leaf = build_x509_svid(
            public_key=key.public_key(),
            spiffe_id=sid,
            issuer_cert=self.certificate,
            issuer_key=self.key,
            not_before=not_before or now - BACKDATE,
            not_after=not_after or now + dt.timedelta(seconds=ttl),
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        return X509Svid(sid, (leaf, *self.intermediates), key, hint)

    def issue_leaf(
        self,
        spiffe_id: SpiffeId | str | None = "/workload",
        *,
        uri_sans: Sequence[str] | None = None,
        ttl: float = 3600,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        ca: bool = False,
        basic_constraints: bool = True,
        key_usage: bool = True,
        digital_signature: bool = True,
        key_encipherment: bool = False,
        key_cert_sign: bool = False,
        crl_sign: bool = False,
        eku: bool = True,
        ski: bool = True,
        aki: bool = True,
        dns_names: Sequence[str] = (),
        key_kind: str = "ec-p256",
        private_key: PrivateKey | None = None,
    ) -> IssuedCertificate:
        """A leaf built from explicit knobs and NOT checked: use it to make certificates that break a rule.

        With the defaults the result follows the profile. ``uri_sans`` replaces the single SPIFFE ID SAN
        (e.g. two IDs, or a string that is not a SPIFFE ID); ``spiffe_id=None`` with no ``uri_sans`` gives
        a leaf without any URI SAN. Validity dates are not capped by the issuer's, so a leaf may even
        outlive its CA.
        """
        key = private_key or generate_key(key_kind)
        public_key = key.public_key()
        now = self.now()
        uris = list(uri_sans) if uri_sans is not None else ([] if spiffe_id is None else [str(self._sid(spiffe_id))])
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns_names]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera Test")]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - BACKDATE)
            .not_valid_after(not_after or now + dt.timedelta(seconds=ttl))
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if basic_constraints:
            builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if key_usage:
            builder = builder.add_extension(
                _key_usage(
                    digital_signature=digital_signature,
                    key_encipherment=key_encipherment,
                    key_cert_sign=key_cert_sign,
                    crl_sign=crl_sign,
                ),
                critical=True,
            )
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        if ski:
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        if aki:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier(subject_key_identifier(self.certificate), None, None), critical=False
            )
        leaf = builder.sign(self.key, signature_hash(self.key))  # type: ignore[arg-type]
        return IssuedCertificate((leaf, *self.intermediates), key)

    def issue_intermediate(
        self,
        *,
        ttl: dt.timedelta = dt.timedelta(days=7),
        key_kind: str = "ec-p256",
        ca: bool = True,
        key_cert_sign: bool = True,
        basic_constraints: bool = True,
        key_usage: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> TestCA:
        """An intermediate CA signed by this one; SVIDs it issues carry it in their chain.

        With ``ca=False``, ``key_cert_sign=False``, ``basic_constraints=False`` or ``key_usage=False`` the
        intermediate breaks the corresponding signing-certificate rule (use :meth:`issue_leaf` on it then,
        since :meth:`issue_svid` refuses to build an SVID with a broken chain).
        """
        child = TestCA.__new__(TestCA)
        child.trust_domain = self.trust_domain
        child.key_kind = key_kind
        child._fixed_now = self._fixed_now
        child.key = generate_key(key_kind)
        child.root = self.root
        child._jwt_key = None
        now = self.now()
        start = not_before or now - dt.timedelta(hours=12)
        end = not_after or now + ttl
        if ca and key_cert_sign and basic_constraints and key_usage:
            child.certificate = build_ca_certificate(
                subject_key=child.key,
                issuer_cert=self.certificate,
                issuer_key=self.key,
                trust_domain=self.trust_domain,
                not_before=start,
                not_after=end,
                common_name=f"Tessera Test Intermediate {key_id(child.key.public_key())[:8]}",
            )
        else:
            public_key = child.key.public_key()
            builder = (
                x509.CertificateBuilder()
                .subject_name(
                    x509.Name(
                        [
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera Test"),
                            x509.NameAttribute(NameOID.COMMON_NAME, f"Broken Intermediate {key_id(public_key)[:8]}"),
                        ]
                    )
                )
                .issuer_name(self.certificate.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier(subject_key_identifier(self.certificate), None, None), critical=False
                )
                .add_extension(
                    x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.trust_domain.id_string)]),
                    critical=False,
                )
            )
            if basic_constraints:
                builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            if key_usage:
                builder = builder.add_extension(
                    _key_usage(digital_signature=not key_cert_sign, key_cert_sign=key_cert_sign, crl_sign=True),
                    critical=True,
                )
            child.certificate = builder.sign(self.key, signature_hash(self.key))  # type: ignore[arg-type]
        child.intermediates = (child.certificate, *self.intermediates)
        return child


def _key_usage(
    *, digital_signature: bool, key_encipherment: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
