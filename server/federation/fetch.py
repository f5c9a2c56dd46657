"""Fetching a foreign trust domain's SPIFFE bundle from its bundle endpoint, and deciding whether to believe it.

Profiles (SPIFFE Trust Domain and Bundle, section 5):

* ``https_web``: the endpoint has an ordinary Web PKI certificate for the URL's host name, verified against
  the system roots (plus any configured extra roots, e.g. an organisation's private PKI).
* ``https_spiffe``: the endpoint presents an X509-SVID of the foreign trust domain; it must chain to the
  bundle we already hold for that domain (bootstrapped by the operator, then each fetched one) and carry
  exactly the configured endpoint SPIFFE ID.

A document is refused (the caller keeps its last good bundle) when it is not a SPIFFE bundle, holds no
authority, when an X.509 authority names another trust domain in its URI SAN (an endpoint serving someone
else's bundle), or when its ``spiffe_sequence`` goes backwards (a replayed older bundle could bring back a
revoked CA). Every refusal is a :class:`FetchError` whose message says why, for the log and ``federation show``.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tessera.sdk.bundle import BundleSet, SpiffeBundle
from tessera.sdk.errors import TesseraError
from tessera.sdk.peer import PeerAuthorizationError, presented_chain, verify_peer
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.tls import authorize_id
from tessera.sdk.tlscontext import build_context
from tessera.server.errors import ServerError

PROFILES = ("https_web", "https_spiffe")
MAX_DOCUMENT_BYTES = 1024 * 1024
DEFAULT_TIMEOUT = 10.0


class FetchError(ServerError):
    """The foreign bundle could not be fetched or was not believable (message: why)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to fetch one foreign trust domain's bundle."""

    trust_domain: TrustDomain
    url: str
    profile: str
    endpoint_id: SpiffeId | None = None


def check_endpoint(trust_domain: str, url: str, profile: str, endpoint_spiffe_id: str) -> Endpoint:
    """Validates a relationship's settings (ValueError with a one-line reason)."""
    try:
        td = TrustDomain.parse(trust_domain)
    except TesseraError as exc:
        raise ValueError(f"trust_domain: {exc}") from None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ValueError(f"bundle_endpoint_url: {url!r} is not an https:// URL with a host")
    try:
        _ = parsed.port
    except ValueError:
        raise ValueError(f"bundle_endpoint_url: {url!r} has an invalid port") from None
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
    endpoint_id: SpiffeId | None = None
    if profile == "https_spiffe":
        if not endpoint_spiffe_id:
            raise ValueError("endpoint_spiffe_id: required for the https_spiffe profile")
        try:
            endpoint_id = SpiffeId.parse(endpoint_spiffe_id)
        except TesseraError as exc:
            raise ValueError(f"endpoint_spiffe_id: {exc}") from None
        if not endpoint_id.member_of(td):
            raise ValueError(f"endpoint_spiffe_id: {endpoint_id} is not in trust domain {td}")
    elif endpoint_spiffe_id:
        raise ValueError("endpoint_spiffe_id: only meaningful with the https_spiffe profile")
    return Endpoint(td, url, profile, endpoint_id)


def check_document(td: TrustDomain, document: bytes, current: SpiffeBundle | None) -> SpiffeBundle:
    """Parses and sanity-checks a fetched document (FetchError with the reason)."""
    try:
        bundle = SpiffeBundle.from_document(td, document)
    except (TesseraError, ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"the endpoint served no valid SPIFFE bundle document: {exc}") from None
    if not bundle.x509_authorities and not bundle.jwt_authorities:
        raise FetchError("the endpoint served a bundle without any authority")
    for cert in bundle.x509_authorities:
        named = _uri_trust_domains(cert)
        if named and td.name not in named:
            raise FetchError(
                f"the endpoint served a bundle whose X.509 authority belongs to {', '.join(sorted(named))}, "
                f"not {td.name}"
            )
    if current is not None and bundle.sequence < current.sequence:
        raise FetchError(
            f"the endpoint served sequence {bundle.sequence}, older than the {current.sequence} already held "
            "(a replayed bundle?); use `federation update --bundle-file` if the foreign domain was reset"
        )
    return bundle


def _uri_trust_domains(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names: set[str] = set()
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            names.add(TrustDomain.parse(uri).name)
        except TesseraError:
            continue
    return names


def web_client_context(extra_roots: tuple[Path, ...] = ()) -> ssl.SSLContext:
    """The client context for ``https_web`` endpoints: system roots plus the configured extra roots, host name
    checked, RFC 5280 rules applied strictly (as Python 3.13's default contexts do)."""
    return build_context(False, system_roots=True, root_files=extra_roots, check_hostname=True, strict=True)


def _spiffe_context(bundle: SpiffeBundle) -> ssl.SSLContext:
    if not bundle.x509_authorities:
        raise FetchError("https_spiffe: the bundle held for the endpoint's trust domain has no X.509 authority")
    # No host name check: the name checked is the SPIFFE ID, right after the handshake.
    return build_context(False, roots=bundle.x509_authorities)


def _check_spiffe_peer(sock: ssl.SSLSocket, endpoint: Endpoint, bundle: SpiffeBundle) -> None:
    """The endpoint's chain through the SDK's one peer verifier, against the held bundle alone."""
    assert endpoint.endpoint_id is not None
    try:
        verify_peer(presented_chain(sock), BundleSet([bundle.x509_bundle()]), authorize_id(endpoint.endpoint_id))
    except PeerAuthorizationError as exc:
        raise FetchError(f"https_spiffe: the endpoint's certificate was refused: {exc}") from None


def fetch_bundle(
    endpoint: Endpoint,
    current: SpiffeBundle | None,
    *,
    web_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[SpiffeBundle, bytes]:
    """Fetches and checks the foreign bundle; returns it and the raw document. Blocking (run it in a thread).

    ``current`` is the bundle held now: it authenticates an ``https_spiffe`` endpoint and guards the sequence.
    """
    parsed = urllib.parse.urlsplit(endpoint.url)
    host = parsed.hostname or ""
    port = parsed.port or 443
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    if endpoint.profile == "https_spiffe":
        if current is None:
            raise FetchError("https_spiffe: no bundle is held for the endpoint's trust domain; give a bootstrap bundle")
        context = _spiffe_context(current)
    else:
        context = web_context or web_client_context()
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        try:
            conn.connect()
        except ssl.SSLError as exc:
            raise FetchError(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"cannot connect to {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
        if endpoint.profile == "https_spiffe":
            assert current is not None
            _check_spiffe_peer(conn.sock, endpoint, current)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            response = conn.getresponse()
            body = response.read(MAX_DOCUMENT_BYTES + 1)
        except ssl.SSLError as exc:
            raise FetchError(f"TLS failure talking to {host}:{port}: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"request to {endpoint.url} failed: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise FetchError(f"the endpoint answered HTTP {response.status} {response.reason}")
    if len(body) > MAX_DOCUMENT_BYTES:
        raise FetchError(f"the endpoint's document is larger than {MAX_DOCUMENT_BYTES} bytes")
    return check_document(endpoint.trust_domain, body, current), body
