"""SPIFFE IDs and trust domain names, validated exactly per the SPIFFE ID standard.

Parsing is strict on purpose: an ID that two implementations would read differently (upper case,
percent-encoding, a port, an empty or dot segment) is an authorization bug waiting to happen, so it is
refused with a message naming the rule it broke rather than normalised.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tessera.sdk.errors import SpiffeIdError

SCHEME = "spiffe"
_PREFIX = "spiffe://"
MAX_TRUST_DOMAIN_LENGTH = 255
MAX_SPIFFE_ID_LENGTH = 2048

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_trust_domain_name(name: str) -> None:
    if not name:
        raise SpiffeIdError("trust domain is missing")
    if len(name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} bytes")
    for ch in name:
        if ch in _TD_CHARS:
            continue
        if ch == ":":
            raise SpiffeIdError(f"trust domain {name!r} has a port; ports are not allowed")
        if ch == "@":
            raise SpiffeIdError(f"trust domain {name!r} has userinfo; userinfo is not allowed")
        if ch == "%":
            raise SpiffeIdError(f"trust domain {name!r} is percent-encoded; percent-encoding is not allowed")
        if ch.isupper():
            raise SpiffeIdError(f"trust domain {name!r} has upper-case letters; only lower case is allowed")
        raise SpiffeIdError(
            f"trust domain {name!r} has character {ch!r}; only a-z, 0-9, '.', '-' and '_' are allowed"
        )


def _check_path(path: str) -> None:
    """Validates a non-empty path (starting with '/')."""
    if not path.startswith("/"):
        raise SpiffeIdError(f"path {path!r} must start with '/'")
    if path.endswith("/"):
        raise SpiffeIdError(f"path {path!r} has a trailing '/'")
    for segment in path[1:].split("/"):
        _check_segment(segment)


def _check_segment(segment: str) -> None:
    if segment == "":
        raise SpiffeIdError("path has an empty segment ('//')")
    if segment in (".", ".."):
        raise SpiffeIdError(f"path has a {segment!r} segment; dot segments are not allowed")
    for ch in segment:
        if ch in _PATH_CHARS:
            continue
        if ch == "%":
            raise SpiffeIdError(f"path segment {segment!r} is percent-encoded; percent-encoding is not allowed")
        if ch in "?#":
            raise SpiffeIdError("a SPIFFE ID has no query or fragment")
        raise SpiffeIdError(
            f"path segment {segment!r} has character {ch!r}; only a-z, A-Z, 0-9, '.', '-' and '_' are allowed"
        )


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A trust domain name such as ``example.org`` (lower case, no scheme)."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accepts a bare name (``example.org``) or a trust domain's SPIFFE ID (``spiffe://example.org``)."""
        if "://" in text or text.lower().startswith(SCHEME + ":"):
            sid = SpiffeId.parse(text)
            if sid.path:
                raise SpiffeIdError(f"{text!r} is a workload ID, not a trust domain: it has a path")
            return sid.trust_domain
        return cls(text)

    @property
    def id_string(self) -> str:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``: the key of federated bundle maps."""
        return _PREFIX + self.name

    def spiffe_id(self, *segments: str) -> SpiffeId:
        """The SPIFFE ID in this trust domain with the given path segments."""
        return SpiffeId.from_segments(self, *segments)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A parsed SPIFFE ID: a trust domain and a path (``""`` for the trust domain itself)."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if self.path:
            _check_path(self.path)
        if len(str(self).encode()) > MAX_SPIFFE_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text:
            raise SpiffeIdError("SPIFFE ID is empty")
        if len(text.encode()) > MAX_SPIFFE_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_LENGTH} bytes")
        if not text.startswith(_PREFIX):
            scheme, sep, _ = text.partition("://")
            if sep and scheme.lower() == SCHEME:
                raise SpiffeIdError(f"{text!r}: the scheme must be written in lower case 'spiffe'")
            raise SpiffeIdError(f"{text!r} is not a SPIFFE ID: it must start with 'spiffe://'")
        rest = text[len(_PREFIX) :]
        for mark in "?#":
            if mark in rest:
                raise SpiffeIdError(f"{text!r} has a query or fragment; a SPIFFE ID has neither")
        td_name, slash, path = rest.partition("/")
        if td_name.startswith("["):
            raise SpiffeIdError(f"{text!r}: IP-literal trust domains are not allowed")
        try:
            td = TrustDomain(td_name)
        except SpiffeIdError as exc:
            raise SpiffeIdError(f"{text!r}: {exc}") from None
        if not slash:
            return cls(td)
        try:
            return cls(td, "/" + path)
        except SpiffeIdError as exc:
            raise SpiffeIdError(f"{text!r}: {exc}") from None

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Builds an ID from path segments (each validated; a segment may not contain '/')."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        for segment in segments:
            if "/" in segment:
                raise SpiffeIdError(f"segment {segment!r} contains '/'; pass each segment separately")
            _check_segment(segment)
        return cls(td, "".join("/" + s for s in segments))

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    def member_of(self, trust_domain: TrustDomain | str) -> bool:
        name = trust_domain.name if isinstance(trust_domain, TrustDomain) else trust_domain
        return self.trust_domain.name == name

    def is_workload_id(self) -> bool:
        """Workload SVIDs need a path; a bare trust domain ID only names the domain (or its CA)."""
        return bool(self.path)

    def __str__(self) -> str:
        return _PREFIX + self.trust_domain.name + self.path


def parse_ids(texts: Iterable[str]) -> list[SpiffeId]:
    return [SpiffeId.parse(t) for t in texts]
