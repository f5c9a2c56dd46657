"""The SDK's error hierarchy.

Every error Tessera raises on purpose derives from :class:`TesseraError`, so a caller can catch the whole
family with one clause; the subclasses say which rule failed, and each message names what was wrong so a
person can act on it without reading the source.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Root of every error Tessera raises on purpose (SDK, server and agent alike)."""


class SpiffeIdError(TesseraError, ValueError):
    """A SPIFFE ID or trust domain name breaks the SPIFFE ID rules."""


class SvidError(TesseraError, ValueError):
    """An X509-SVID or JWT-SVID is malformed or breaks the SVID profile."""


class BundleError(TesseraError, ValueError):
    """A trust bundle or SPIFFE bundle document is malformed."""


class VerificationError(TesseraError):
    """A certificate chain or token did not verify against the trust bundle."""


class AuthorizationError(TesseraError):
    """A verified peer's SPIFFE ID is not one the caller authorizes."""


class WorkloadApiError(TesseraError):
    """The Workload API could not be reached or refused the call."""


class UnsafeDirectoryError(TesseraError):
    """A directory meant for key material (or a socket) is not a real directory of the caller's own that only
    it can write: whoever else controls it controls which files a reader finds there."""
