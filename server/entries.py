"""Validation of registration entries: pure rules, no I/O, the clock injected as ``now``.

Every refusal is an :class:`~tessera.server.errors.EntryValidationError` whose ``field`` names the offending
field as the admin API and CLI spell it, so the operator sees which flag to fix. A valid entry comes back
normalized (selectors sorted and unique, DNS names lower case, federated trust domains as bare names), which is
the form the datastore stores and compares.

Bounds, and why:

* ``x509_svid_ttl``: 0 (server default) or 60 s .. 14 days. Agents rotate at about half life, so below a minute
  rotation turns into a signing storm; above two weeks a leaked key stays useful too long. The server still
  caps every SVID at its signing CA's notAfter.
* ``jwt_svid_ttl``: 0 (server default) or 60 s .. 24 h. JWT-SVIDs are bearer tokens that cannot be revoked.
* ``selectors``: 1 .. 64, each ``type:value`` with non-empty parts (see :mod:`tessera.server.selectors`).
  An entry without selectors would match every workload under its parent.
* ``dns_names``: up to 64 RFC 1123 host names (a leading ``*.`` wildcard label allowed), at most 253 bytes;
  IP addresses are refused (a DNS SAN holding an address is not an IP SAN).
* ``hint``: at most 1024 bytes, no control characters.
* ``federates_with``: valid trust domain names other than our own.
* ``expires_at``: None or strictly in the future.

Identity rules: ``spiffe_id`` and ``parent_id`` are SPIFFE IDs of this trust domain. The ``/tessera/`` path
namespace is reserved for the server (``/tessera/server``) and attested agents (``/tessera/agent/...``): no
entry may *name* such an ID, because an entry naming an agent ID would let a workload act as that agent. A
node alias entry (``node``) names a group of agents: its parent is the server's ID and it is never itself
issued an SVID (so TTLs, DNS names, admin, downstream and federates_with make no sense on it). A workload entry's
parent is an agent ID or a node alias ID, never the server.
"""

from __future__ import annotations

import dataclasses
import re

from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.server.datastore.base import RegistrationEntry
from tessera.server.errors import EntryValidationError, SelectorError
from tessera.server.selectors import Selector, check_selector, normalize

X509_SVID_TTL_MIN = 60
X509_SVID_TTL_MAX = 14 * 24 * 3600
JWT_SVID_TTL_MIN = 60
JWT_SVID_TTL_MAX = 24 * 3600
MAX_SELECTORS = 64
MAX_DNS_NAMES = 64
MAX_DNS_NAME_LENGTH = 253
MAX_HINT_BYTES = 1024
MAX_FEDERATES_WITH = 64
MAX_ENTRY_ID_LENGTH = 128
MAX_UNIX_TIME = 2**63 - 1

RESERVED_PREFIX = "/tessera/"
AGENT_PREFIX = "/tessera/agent/"

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENTRY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def server_id(trust_domain: TrustDomain) -> SpiffeId:
    """The server's own SPIFFE ID: the parent of node alias entries."""
    return trust_domain.spiffe_id("tessera", "server")


def _parse_id(field: str, text: str, td: TrustDomain) -> SpiffeId:
    if not text:
        raise EntryValidationError(field, "is required")
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise EntryValidationError(field, str(exc)) from None
    if not sid.member_of(td):
        raise EntryValidationError(field, f"{text} is not in trust domain {td.name}")
    if not sid.path:
        raise EntryValidationError(field, f"{text} names the trust domain itself; it needs a path")
    return sid


def _check_ttl(field: str, ttl: object, low: int, high: int) -> None:
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise EntryValidationError(field, f"must be an integer number of seconds, got {ttl!r}")
    if ttl != 0 and not low <= ttl <= high:
        raise EntryValidationError(field, f"must be 0 (server default) or between {low}s and {high}s, got {ttl}s")


def validate_selectors(
    selectors: tuple[Selector, ...] | list[Selector], field: str = "selectors"
) -> tuple[Selector, ...]:
    """Checks every selector's form and bounds; returns them normalized. At least one is required."""
    if not selectors:
        raise EntryValidationError(field, "at least one selector is required (type:value)")
    for selector in selectors:
        if not isinstance(selector, Selector):
            raise EntryValidationError(field, f"{selector!r} is not a Selector")
        try:
            check_selector(selector)
        except SelectorError as exc:
            raise EntryValidationError(field, str(exc)) from None
    normalized = normalize(selectors)
    if len(normalized) > MAX_SELECTORS:
        raise EntryValidationError(field, f"at most {MAX_SELECTORS} selectors are allowed, got {len(normalized)}")
    return normalized


def validate_dns_name(name: str, field: str = "dns_names") -> str:
    """Checks an RFC 1123 host name (optionally ``*.`` wildcard) and returns it in lower case."""
    if not isinstance(name, str) or not name:
        raise EntryValidationError(field, "a DNS name is empty")
    lowered = name.lower().removesuffix(".")
    if len(lowered) > MAX_DNS_NAME_LENGTH:
        raise EntryValidationError(field, f"DNS name {name[:40]!r}... is longer than {MAX_DNS_NAME_LENGTH} bytes")
    labels = lowered.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            raise EntryValidationError(field, f"wildcard DNS name {name!r} must have at least two labels after '*.'")
        labels = labels[1:]
    for label in labels:
        if not _LABEL.match(label):
            raise EntryValidationError(
                field,
                f"DNS name {name!r} has an invalid label {label!r} (1-63 of a-z, 0-9, '-', not starting or ending "
                "with '-'; '*' only as the whole first label)",
            )
    if labels[-1].isdigit():
        raise EntryValidationError(field, f"{name!r} looks like an IP address; DNS names must be host names")
    return lowered


def validate_hint(hint: str) -> str:
    if not isinstance(hint, str):
        raise EntryValidationError("hint", f"must be a string, got {hint!r}")
    if len(hint.encode()) > MAX_HINT_BYTES:
        raise EntryValidationError("hint", f"is longer than {MAX_HINT_BYTES} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in hint):
        raise EntryValidationError("hint", "must not contain control characters")
    return hint


def validate_federates_with(names: tuple[str, ...] | list[str], own: TrustDomain) -> tuple[str, ...]:
    result: set[str] = set()
    for name in names:
        try:
            td = TrustDomain.parse(name)
        except SpiffeIdError as exc:
            raise EntryValidationError("federates_with", str(exc)) from None
        if td == own:
            raise EntryValidationError("federates_with", f"{name} is this server's own trust domain")
        result.add(td.name)
    if len(result) > MAX_FEDERATES_WITH:
        raise EntryValidationError("federates_with", f"at most {MAX_FEDERATES_WITH} trust domains are allowed")
    return tuple(sorted(result))


def validate_entry(
    entry: RegistrationEntry,
    *,
    trust_domain: TrustDomain | str,
    now: int,
) -> RegistrationEntry:
    """Checks every field of an entry about to be created or updated; returns the normalized entry.

    For a node alias entry an empty ``parent_id`` is filled in with the server's ID. ``revision`` and
    ``created_at`` are left for the datastore.
    """
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
    server = server_id(td)

    if entry.id and (len(entry.id) > MAX_ENTRY_ID_LENGTH or not _ENTRY_ID.match(entry.id)):
        raise EntryValidationError(
            "id", f"{entry.id[:40]!r} is not a valid entry id (letters, digits, '.', '_', '-'; at most 128)"
        )

    spiffe_id = _parse_id("spiffe_id", entry.spiffe_id, td)
    if spiffe_id.path == RESERVED_PREFIX.rstrip("/") or spiffe_id.path.startswith(RESERVED_PREFIX):
        raise EntryValidationError(
            "spiffe_id",
            f"{spiffe_id} is in the reserved /tessera/ namespace (the server's and attested agents' own IDs)",
        )

    parent_text = entry.parent_id or (str(server) if entry.node else "")
    parent = _parse_id("parent_id", parent_text, td)
    if entry.node:
        if parent != server:
            raise EntryValidationError(
                "parent_id", f"a node alias entry's parent must be the server ({server}), got {parent}"
            )
    else:
        if parent == server:
            raise EntryValidationError(
                "parent_id",
                f"{parent} is the server's ID; entries parented to the server are node alias entries (use --node)",
            )
        if parent.path.startswith(RESERVED_PREFIX) and not parent.path.startswith(AGENT_PREFIX):
            raise EntryValidationError(
                "parent_id", f"{parent} is in the reserved /tessera/ namespace but is not an agent ID"
            )
        if parent == spiffe_id:
            raise EntryValidationError("parent_id", "an entry cannot be its own parent")

    selectors = validate_selectors(entry.selectors)
    _check_ttl("x509_svid_ttl", entry.x509_svid_ttl, X509_SVID_TTL_MIN, X509_SVID_TTL_MAX)
    _check_ttl("jwt_svid_ttl", entry.jwt_svid_ttl, JWT_SVID_TTL_MIN, JWT_SVID_TTL_MAX)

    if len(entry.dns_names) > MAX_DNS_NAMES:
        raise EntryValidationError("dns_names", f"at most {MAX_DNS_NAMES} DNS names are allowed")
    dns_names = tuple(dict.fromkeys(validate_dns_name(n) for n in entry.dns_names))
    hint = validate_hint(entry.hint)
    federates_with = validate_federates_with(entry.federates_with, td)

    if entry.expires_at is not None:
        if not isinstance(entry.expires_at, int) or isinstance(entry.expires_at, bool):
            raise EntryValidationError("expires_at", f"must be unix seconds, got {entry.expires_at!r}")
        if entry.expires_at <= now:
            raise EntryValidationError("expires_at", f"{entry.expires_at} is not in the future (now is {now})")
        if entry.expires_at > MAX_UNIX_TIME:
            raise EntryValidationError("expires_at", "is out of range")

    if entry.node:
        for field, value in (
            ("x509_svid_ttl", entry.x509_svid_ttl),
            ("jwt_svid_ttl", entry.jwt_svid_ttl),
            ("dns_names", dns_names),
            ("admin", entry.admin),
            ("downstream", entry.downstream),
            ("federates_with", federates_with),
        ):
            if value:
                raise EntryValidationError(
                    field,
                    "does not apply to a node alias entry: it names a group of agents and is never issued an SVID",
                )

    return dataclasses.replace(
        entry,
        spiffe_id=str(spiffe_id),
        parent_id=str(parent),
        selectors=selectors,
        dns_names=dns_names,
        hint=hint,
        federates_with=federates_with,
    )
