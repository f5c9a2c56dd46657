"""Writing identity files so a reader never sees half a file or a key with loose permissions.

Each file is written to a temporary file in the same directory, given its final mode with ``fchmod`` (so
the umask cannot loosen or tighten it), flushed to disk, then renamed over the old one: a process reloading
at any moment reads either the old or the new content, never a mix.
"""

from __future__ import annotations

import json

from tessera.sdk.bundle import BundleSet, JwtBundle, X509Bundle
from tessera.sdk.files import ensure_owned_dir
from tessera.sdk.svid import X509Svid, certificates_to_pem
from tessera.sdk.workloadapi.common import X509Context


def bundle_pem(context: X509Context, svid: X509Svid, include_federated: bool) -> bytes:
    """The SVID's own trust domain's CAs, then (on request) the federated ones."""
    own = context.bundles.get(svid.spiffe_id.trust_domain)
    bundles: list[X509Bundle] = [own] if own is not None else []
    if include_federated:
        bundles += [b for td, b in sorted(context.bundles.items()) if td != svid.spiffe_id.trust_domain]
    return certificates_to_pem(cert for bundle in bundles for cert in bundle.authorities)


def jwt_bundles_json(bundles: BundleSet[JwtBundle]) -> bytes:
    """``{"spiffe://td": <JWKS>, ...}``: every trust domain's JWT keys, the shape JWT validators load."""
    doc = {td.id_string: json.loads(bundle.to_jwks()) for td, bundle in sorted(bundles.items())}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


CERT_DIR_MODE = 0o755
"""A cert_dir the helper makes: others may read the certificates (the key file itself is 0600)."""


def ensure_dir(path: str) -> None:
    """cert_dir, made 0755 whatever the umask, or checked to be the helper user's own and writable by it
    alone (it receives private keys); see tessera.sdk.files.ensure_owned_dir."""
    ensure_owned_dir(path, CERT_DIR_MODE)
