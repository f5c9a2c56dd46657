"""Trust bundles: X.509 authorities, JWT keys, and the SPIFFE bundle document that carries both.

A bundle always belongs to exactly one trust domain: verification picks the bundle of the *peer's* trust
domain, so a CA trusted for one domain can never vouch for an identity in another.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tessera.sdk.errors import BundleError, SpiffeIdError, SvidError, VerificationError
from tessera.sdk.keys import PublicKey, as_public_key, public_key_der, public_keys_equal
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.svid import certificates_to_der, certificates_to_pem, parse_der_certificates, parse_pem_certificates
from tessera.sdk.x509profile import load_der_certificate

X509_SVID_USE = "x509-svid"
JWT_SVID_USE = "jwt-svid"


def _td(value: TrustDomain | str) -> TrustDomain:
    if isinstance(value, TrustDomain):
        return value
    try:
        return TrustDomain.parse(value)
    except SpiffeIdError as exc:
        raise BundleError(f"bundle trust domain is invalid: {exc}") from None


def _dedupe(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# X.509 bundles


@dataclass(frozen=True, slots=True)
class X509Bundle:
    """The X.509 authorities (root or intermediate CA certificates) trusted for one trust domain."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", _td(self.trust_domain))
        object.__setattr__(self, "authorities", _dedupe(self.authorities))

    @classmethod
    def parse_der(cls, trust_domain: TrustDomain | str, data: bytes) -> X509Bundle:
        """Parses concatenated DER certificates (the Workload API encoding; it is never empty there)."""
        td = _td(trust_domain)
        try:
            certs = parse_der_certificates(data)
        except SvidError as exc:
            raise BundleError(f"X.509 bundle for {td}: {exc}") from None
        if not certs:
            raise BundleError(f"X.509 bundle for {td} is empty")
        return cls(td, tuple(certs))

    @classmethod
    def parse_pem(cls, trust_domain: TrustDomain | str, data: bytes) -> X509Bundle:
        td = _td(trust_domain)
        try:
            certs = parse_pem_certificates(data)
        except SvidError as exc:
            raise BundleError(f"X.509 bundle for {td}: {exc}") from None
        if not certs:
            raise BundleError(f"X.509 bundle for {td} is empty")
        return cls(td, tuple(certs))

    def der(self) -> bytes:
        return certificates_to_der(self.authorities)

    def pem(self) -> bytes:
        return certificates_to_pem(self.authorities)

    def contains(self, cert: x509.Certificate) -> bool:
        der = cert.public_bytes(serialization.Encoding.DER)
        return any(a.public_bytes(serialization.Encoding.DER) == der for a in self.authorities)

    def __len__(self) -> int:
        return len(self.authorities)

    def __repr__(self) -> str:
        return f"X509Bundle(trust_domain={self.trust_domain.name!r}, authorities={len(self.authorities)})"


# --------------------------------------------------------------------------------------------------------
# JWK encoding


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise BundleError(f"JWK member {what!r} is missing or not a string")
    if "=" in value or "+" in value or "/" in value:
        raise BundleError(f"JWK member {what!r} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise BundleError(f"JWK member {what!r} is not valid base64url") from None


def _uint_bytes(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length if length is not None else max(1, (value.bit_length() + 7) // 8), "big")


_JWK_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def public_key_to_jwk(public_key: PublicKey) -> dict[str, Any]:
    """The JWK members describing a public key (RFC 7518; EC coordinates padded to the curve's size)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(public_key.curve.name)
        if crv is None:
            raise BundleError(f"EC curve {public_key.curve.name} has no JWK name")
        size = (public_key.curve.key_size + 7) // 8
        numbers = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(_uint_bytes(numbers.x, size)),
            "y": _b64url(_uint_bytes(numbers.y, size)),
        }
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        return {"kty": "RSA", "n": _b64url(_uint_bytes(rsa_numbers.n)), "e": _b64url(_uint_bytes(rsa_numbers.e))}
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}


def is_known_key_type(jwk: Mapping[str, Any]) -> bool:
    """Whether a JWK's ``kty`` (and curve) is one this library can use; others are skipped, never fatal."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return True
    if kty == "EC":
        return isinstance(crv, str) and crv in _JWK_CURVES
    if kty == "OKP":
        return crv == "Ed25519"
    return False


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key a JWK describes; raises :class:`BundleError` naming the bad member."""
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            crv = jwk.get("crv")
            curve = _JWK_CURVES.get(crv) if isinstance(crv, str) else None
            if curve is None:
                raise BundleError(f"JWK has unsupported EC curve {crv!r}")
            size = (curve.key_size + 7) // 8
            xb, yb = _b64url_decode(jwk.get("x"), "x"), _b64url_decode(jwk.get("y"), "y")
            if len(xb) != size or len(yb) != size:
                raise BundleError(f"JWK EC coordinates must be exactly {size} bytes for {crv}")
            numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), curve)
            return numbers.public_key()
        if kty == "RSA":
            n = int.from_bytes(_b64url_decode(jwk.get("n"), "n"), "big")
            e = int.from_bytes(_b64url_decode(jwk.get("e"), "e"), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        if kty == "OKP":
            if jwk.get("crv") != "Ed25519":
                raise BundleError(f"JWK has unsupported OKP curve {jwk.get('crv')!r}")
            return ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk.get("x"), "x"))
    except ValueError as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"JWK does not describe a valid {kty} public key: {exc}") from None
    raise BundleError(f"JWK has unsupported key type (kty) {kty!r}")


def _load_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{what} must be a JSON object")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise BundleError(f"{what} has no 'keys' array")
    if not all(isinstance(k, dict) for k in keys):
        raise BundleError(f"{what}: every entry of 'keys' must be a JSON object")
    return doc


def _jwt_key_from_entry(entry: Mapping[str, Any], index: int, what: str) -> tuple[str, PublicKey]:
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{what}: JWT authority #{index} has no 'kid'")
    try:
        return kid, public_key_from_jwk(entry)
    except BundleError as exc:
        raise BundleError(f"{what}: JWT authority {kid!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------------
# JWT bundles


class JwtBundle:
    """The JWT signing keys trusted for one trust domain, by key ID (``kid``)."""

    __slots__ = ("_keys", "trust_domain")

    def __init__(self, trust_domain: TrustDomain | str, keys: Mapping[str, PublicKey]) -> None:
        self.trust_domain = _td(trust_domain)
        for kid in keys:
            if not kid:
                raise BundleError(f"JWT bundle for {self.trust_domain}: a key ID is empty")
        self._keys: dict[str, PublicKey] = dict(keys)

    @property
    def keys(self) -> Mapping[str, PublicKey]:
        return dict(self._keys)

    def get(self, kid: str) -> PublicKey | None:
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JwtBundle):
            return NotImplemented
        return (
            self.trust_domain == other.trust_domain
            and self._keys.keys() == other._keys.keys()
            and all(public_keys_equal(k, other._keys[kid]) for kid, k in self._keys.items())
        )

    def __hash__(self) -> int:
        return hash((self.trust_domain, frozenset((kid, public_key_der(k)) for kid, k in self._keys.items())))

    def __repr__(self) -> str:
        return f"JwtBundle(trust_domain={self.trust_domain.name!r}, kids={sorted(self._keys)!r})"

    def to_jwks(self) -> bytes:
        """A JWK Set of the keys, each with its ``kid`` (the Workload API's JWT bundle encoding)."""
        keys = [{**public_key_to_jwk(key), "kid": kid, "use": JWT_SVID_USE} for kid, key in sorted(self._keys.items())]
        return json.dumps({"keys": keys}, separators=(",", ":")).encode()

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain | str, data: bytes | str) -> JwtBundle:
        """Parses a JWK Set. Entries marked for another use (e.g. ``x509-svid``) are skipped."""
        td = _td(trust_domain)
        what = f"JWT bundle for {td}"
        doc = _load_json_object(data, what)
        keys: dict[str, PublicKey] = {}
        for index, entry in enumerate(doc["keys"]):
            use = entry.get("use")
            if (use is not None and use != JWT_SVID_USE) or not is_known_key_type(entry):
                continue
            kid, key = _jwt_key_from_entry(entry, index, what)
            if kid in keys:
                raise BundleError(f"{what}: key ID {kid!r} appears twice")
            keys[kid] = key
        return cls(td, keys)


# --------------------------------------------------------------------------------------------------------
# The SPIFFE bundle document


@dataclass(frozen=True, slots=True, eq=False)
class SpiffeBundle:
    """A trust domain's full bundle: X.509 and JWT authorities plus the document's sequence and refresh hint.

    This is what federation serves and what ``bundle show -format spiffe`` prints.
    """

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=dict)
    sequence: int = 0
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", _td(self.trust_domain))
        object.__setattr__(self, "x509_authorities", _dedupe(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", dict(self.jwt_authorities))
        if isinstance(self.sequence, bool) or not isinstance(self.sequence, int) or not 0 <= self.sequence < 2**64:
            raise BundleError(f"SPIFFE bundle sequence must be an unsigned 64-bit integer, got {self.sequence!r}")
        if self.refresh_hint is not None and (
            isinstance(self.refresh_hint, bool) or not isinstance(self.refresh_hint, int) or self.refresh_hint < 0
        ):
            raise BundleError(f"SPIFFE bundle refresh hint must be a non-negative integer, got {self.refresh_hint!r}")

    @classmethod
    def from_bundles(
        cls,
        x509_bundle: X509Bundle | None,
        jwt_bundle: JwtBundle | None,
        sequence: int = 0,
        refresh_hint: int | None = None,
    ) -> SpiffeBundle:
        td = x509_bundle.trust_domain if x509_bundle is not None else None
        if jwt_bundle is not None:
            if td is not None and td != jwt_bundle.trust_domain:
                raise BundleError(f"X.509 bundle is for {td} but JWT bundle is for {jwt_bundle.trust_domain}")
            td = jwt_bundle.trust_domain
        if td is None:
            raise BundleError("a SPIFFE bundle needs at least an X.509 or a JWT bundle")
        return cls(
            td,
            x509_bundle.authorities if x509_bundle else (),
            jwt_bundle.keys if jwt_bundle else {},
            sequence,
            refresh_hint,
        )

    def x509_bundle(self) -> X509Bundle:
        return X509Bundle(self.trust_domain, self.x509_authorities)

    def jwt_bundle(self) -> JwtBundle:
        return JwtBundle(self.trust_domain, self.jwt_authorities)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpiffeBundle):
            return NotImplemented
        return (
            self.trust_domain == other.trust_domain
            and self.x509_bundle() == other.x509_bundle()
            and self.jwt_bundle() == other.jwt_bundle()
            and self.sequence == other.sequence
            and self.refresh_hint == other.refresh_hint
        )

    def __hash__(self) -> int:
        return hash((self.trust_domain, self.x509_authorities, self.jwt_bundle(), self.sequence, self.refresh_hint))

    def to_document(self) -> bytes:
        """The SPIFFE bundle document (a JWK Set with ``spiffe_sequence`` and ``spiffe_refresh_hint``)."""
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            entry = {"use": X509_SVID_USE, **public_key_to_jwk(as_public_key(cert.public_key()))}
            entry["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")]
            keys.append(entry)
        for kid, key in sorted(self.jwt_authorities.items()):
            keys.append({"use": JWT_SVID_USE, "kid": kid, **public_key_to_jwk(key)})
        doc: dict[str, Any] = {"keys": keys, "spiffe_sequence": self.sequence}
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return json.dumps(doc, indent=4).encode() + b"\n"

    @classmethod
    def from_document(cls, trust_domain: TrustDomain | str, data: bytes | str) -> SpiffeBundle:
        """Parses a SPIFFE bundle document.

        Per the SPIFFE bundle format, entries with an unknown or missing ``use`` or key type (``kty``, or an
        EC/OKP curve this library does not know) are ignored; known entries that are malformed are errors.
        """
        td = _td(trust_domain)
        what = f"SPIFFE bundle for {td}"
        doc = _load_json_object(data, what)
        sequence = doc.get("spiffe_sequence", 0)
        if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 2**64:
            raise BundleError(f"{what}: 'spiffe_sequence' must be an unsigned integer")
        hint = doc.get("spiffe_refresh_hint")
        if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint < 0):
            raise BundleError(f"{what}: 'spiffe_refresh_hint' must be a non-negative integer (seconds)")
        authorities: list[x509.Certificate] = []
        jwt_keys: dict[str, PublicKey] = {}
        for index, entry in enumerate(doc["keys"]):
            if not is_known_key_type(entry):
                continue  # the bundle format says: ignore unknown key types (and a missing kty is unknown)
            use = entry.get("use")
            if use == X509_SVID_USE:
                cert = _x509_authority_from_entry(entry, index, what)
                if cert is not None:
                    authorities.append(cert)
            elif use == JWT_SVID_USE:
                kid, key = _jwt_key_from_entry(entry, index, what)
                if kid in jwt_keys:
                    raise BundleError(f"{what}: JWT key ID {kid!r} appears twice")
                jwt_keys[kid] = key
        return cls(td, tuple(authorities), jwt_keys, sequence, hint)


def _x509_authority_from_entry(entry: Mapping[str, Any], index: int, what: str) -> x509.Certificate | None:
    """The CA certificate of an ``x509-svid`` entry, or None when the entry must be ignored.

    X509-SVID standard, section 6.2: an entry without ``x5c`` (or with an empty one) is ignored, and of
    several values only the first counts. (Tessera itself always writes exactly one.)
    """
    x5c = entry.get("x5c")
    if x5c is None or x5c == []:
        return None
    if not isinstance(x5c, list) or not isinstance(x5c[0], str):
        raise BundleError(f"{what}: X.509 authority #{index}: 'x5c' must be a list of base64 DER certificates")
    if "kid" in entry:
        raise BundleError(f"{what}: X.509 authority #{index} must not have a 'kid'")
    try:
        cert = load_der_certificate(base64.b64decode(x5c[0], validate=True))
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{what}: X.509 authority #{index} has an invalid certificate: {exc}") from None
    try:
        cert_key = as_public_key(cert.public_key())
        jwk_key = public_key_from_jwk(entry)
    except (SvidError, BundleError) as exc:
        raise BundleError(f"{what}: X.509 authority #{index}: {exc}") from None
    if not public_keys_equal(jwk_key, cert_key):
        raise BundleError(f"{what}: X.509 authority #{index}: JWK key does not match its x5c certificate")
    return cert


# --------------------------------------------------------------------------------------------------------
# Sets of bundles

B = TypeVar("B", X509Bundle, JwtBundle)


class BundleSet(Mapping[TrustDomain, B], Generic[B]):
    """Bundles by trust domain: what a verifier consults for the bundle of the peer's own trust domain.

    Immutable; ``with_bundle``/``without`` return new sets, so a snapshot handed to another thread never
    changes under it.
    """

    __slots__ = ("_bundles",)

    def __init__(self, bundles: Iterable[B] = ()) -> None:
        self._bundles: dict[TrustDomain, B] = {}
        for bundle in bundles:
            self._bundles[bundle.trust_domain] = bundle

    def __getitem__(self, trust_domain: TrustDomain) -> B:
        return self._bundles[trust_domain]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def get(self, trust_domain: TrustDomain | str, default: B | None = None) -> B | None:  # type: ignore[override]
        """The bundle for a trust domain (a :class:`TrustDomain`, a name or ``spiffe://name``), or ``default``."""
        try:
            td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        except SpiffeIdError:
            return default
        return self._bundles.get(td, default)

    def __call__(self, trust_domain: TrustDomain) -> B | None:
        """Lets a set be passed wherever a ``trust domain -> bundle`` callable is expected."""
        return self._bundles.get(trust_domain)

    def with_bundle(self, bundle: B) -> BundleSet[B]:
        bundles = list(self._bundles.values())
        bundles.append(bundle)
        return BundleSet(bundles)

    def without(self, trust_domain: TrustDomain) -> BundleSet[B]:
        return BundleSet([b for td, b in self._bundles.items() if td != trust_domain])

    def __repr__(self) -> str:
        return f"BundleSet({sorted(td.name for td in self._bundles)!r})"


def bundle_for(source: BundleSet[B] | B | Callable[[TrustDomain], B | None], trust_domain: TrustDomain, kind: str) -> B:
    """The ``kind`` ("X.509", "JWT") bundle of ``trust_domain`` from what a verifier was given: a set, one bundle, or a
    ``trust domain -> bundle`` callable. Never another domain's: a CA or key trusted for one trust domain must not
    vouch for an identity of another, whatever a custom source returns."""
    if isinstance(source, X509Bundle | JwtBundle):
        if source.trust_domain != trust_domain:
            raise VerificationError(
                f"no {kind} bundle for trust domain {trust_domain}: the only bundle given is for {source.trust_domain}"
            )
        bundle: B | None = source
    elif isinstance(source, BundleSet):
        bundle = source.get(trust_domain)
    else:
        bundle = source(trust_domain)
    if bundle is None:
        raise VerificationError(f"no {kind} bundle for trust domain {trust_domain} (unknown trust domain)")
    if bundle.trust_domain != trust_domain:
        raise VerificationError(
            f"bundle source returned the bundle of {bundle.trust_domain} for trust domain {trust_domain}"
        )
    return bundle
