"""X509-SVID verification: the leaf rules, then RFC 5280 path validation against the right bundle.

The bundle used is always the one of the trust domain named in the leaf's SPIFFE ID, never a union of every
trusted root: otherwise a CA trusted for ``partner.org`` could mint ``spiffe://example.org/admin``.
Path validation is done by ``cryptography.x509.verification`` (the Rust verifier used by pyca), with the
extension policies relaxed to what SPIFFE requires (the Web PKI defaults would demand, e.g., AKI on every
leaf and keyUsage on every root, which SPIFFE deployments with an upstream PKI do not always have).
Each check raises :class:`VerificationError` with a message naming the rule that failed.

Limitations inherited from the Rust verifier: only the Web PKI signature algorithms are accepted (RSA
>= 2048 bits with PKCS#1 v1.5 or PSS, ECDSA P-256/P-384/P-521); Ed25519-signed chains are refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.x509 import verification as xv

from tessera.sdk.bundle import BundleSet, X509Bundle, bundle_for
from tessera.sdk.errors import VerificationError
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.x509profile import check_parseable, check_signing_certificate, check_x509_svid_leaf

BundleSource = BundleSet[X509Bundle] | X509Bundle | Callable[[TrustDomain], X509Bundle | None]

#: Longest chain accepted (leaf + intermediates + anchor): generous for nested upstream CAs.
MAX_CHAIN_DEPTH = 8


def _require_ca_flag(_policy: xv.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints) -> None:
    if not ext.ca:
        raise ValueError("basicConstraints cA is false")


def _key_cert_sign_if_present(_policy: xv.Policy, _cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("keyUsage lacks keyCertSign")


def _policies() -> tuple[xv.ExtensionPolicy, xv.ExtensionPolicy]:
    ca_policy = (
        xv.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, xv.Criticality.AGNOSTIC, _require_ca_flag)
        .may_be_present(x509.KeyUsage, xv.Criticality.AGNOSTIC, _key_cert_sign_if_present)
    )
    # Leaf rules are checked by check_x509_svid_leaf with precise messages before path validation runs.
    return ca_policy, xv.ExtensionPolicy.permit_all()


_CA_POLICY, _EE_POLICY = _policies()


def _bundle_for(bundles: BundleSource, trust_domain: TrustDomain) -> X509Bundle:
    bundle = bundle_for(bundles, trust_domain, "X.509")
    if not bundle.authorities:
        raise VerificationError(f"the X.509 bundle for trust domain {trust_domain} has no authorities")
    return bundle


def _check_time(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(f"{what} is not yet valid (notBefore {cert.not_valid_before_utc.isoformat()})")
    if now > cert.not_valid_after_utc:
        raise VerificationError(f"{what} has expired (notAfter {cert.not_valid_after_utc.isoformat()})")


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundles: BundleSource,
    now: dt.datetime | None = None,
) -> tuple[SpiffeId, list[x509.Certificate]]:
    """Verifies an X509-SVID chain (leaf first) and returns its SPIFFE ID and the verified chain.

    The verified chain runs from the leaf to the trust anchor taken from the bundle. ``bundles`` is a
    :class:`BundleSet`, a single :class:`X509Bundle`, or a callable mapping a trust domain to its bundle
    (or None when unknown). ``now`` defaults to the current time (it must be timezone-aware).
    """
    if not chain:
        raise VerificationError("no certificates to verify: the peer presented an empty chain")
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    leaf, intermediates = chain[0], list(chain[1:])
    check_parseable(leaf, "leaf certificate", VerificationError)
    for index, cert in enumerate(intermediates, start=1):
        check_parseable(cert, f"intermediate certificate #{index}", VerificationError)
    spiffe_id = check_x509_svid_leaf(leaf, VerificationError)
    for index, cert in enumerate(intermediates, start=1):
        check_signing_certificate(cert, VerificationError, what=f"intermediate certificate #{index}")
    bundle = _bundle_for(bundles, spiffe_id.trust_domain)
    _check_time(leaf, now, f"leaf certificate of {spiffe_id}")
    for index, cert in enumerate(intermediates, start=1):
        _check_time(cert, now, f"intermediate certificate #{index} ({cert.subject.rfc4514_string()})")
    try:
        verifier = (
            xv.PolicyBuilder()
            .store(xv.Store(list(bundle.authorities)))
            .time(now)
            .max_chain_depth(MAX_CHAIN_DEPTH)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        verified = verifier.verify(leaf, intermediates)
    except xv.VerificationError as exc:
        raise VerificationError(
            f"certificate chain of {spiffe_id} does not chain to the X.509 bundle of trust domain "
            f"{spiffe_id.trust_domain}: {exc}"
        ) from None
    return spiffe_id, list(verified.chain)
