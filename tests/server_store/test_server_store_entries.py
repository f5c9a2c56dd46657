"""Registration entry validation (pure): every rule refuses with a message naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from tessera.sdk.spiffeid import TrustDomain
from tessera.server.datastore import RegistrationEntry, Selector
from tessera.server.entries import (
    JWT_SVID_TTL_MAX,
    MAX_HINT_BYTES,
    MAX_SELECTORS,
    X509_SVID_TTL_MAX,
    X509_SVID_TTL_MIN,
    server_id,
    validate_dns_name,
    validate_entry,
)
from tessera.server.errors import EntryValidationError

TD = TrustDomain("example.org")
NOW = 1_800_000_000
AGENT = "spiffe://example.org/tessera/agent/join_token/abc"
SERVER = "spiffe://example.org/tessera/server"


def base(**changes: object) -> RegistrationEntry:
    e = RegistrationEntry(
        id="",
        spiffe_id="spiffe://example.org/web",
        parent_id=AGENT,
        selectors=(Selector("unix", "uid:1000"),),
    )
    return dataclasses.replace(e, **changes)  # type: ignore[arg-type]


def refused(entry: RegistrationEntry, field: str, message: str = "") -> None:
    with pytest.raises(EntryValidationError, match=message) as info:
        validate_entry(entry, trust_domain=TD, now=NOW)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_valid_entry_is_normalized() -> None:
    got = validate_entry(
        base(
            selectors=(Selector("unix", "uid:1000"), Selector("k8s", "ns:a"), Selector("unix", "uid:1000")),
            dns_names=("Web.Example.ORG", "web.example.org", "*.svc.example.org"),
            federates_with=("spiffe://b.test", "a.test", "b.test"),
            x509_svid_ttl=X509_SVID_TTL_MIN,
            jwt_svid_ttl=JWT_SVID_TTL_MAX,
            expires_at=NOW + 1,
            hint="x" * MAX_HINT_BYTES,
        ),
        trust_domain="example.org",
        now=NOW,
    )
    assert got.selectors == (Selector("k8s", "ns:a"), Selector("unix", "uid:1000"))
    assert got.dns_names == ("web.example.org", "*.svc.example.org")
    assert got.federates_with == ("a.test", "b.test")


def test_parent_may_be_a_node_alias() -> None:
    validate_entry(base(parent_id="spiffe://example.org/nodes/web"), trust_domain=TD, now=NOW)


def test_node_alias_entry_gets_the_server_as_parent() -> None:
    got = validate_entry(
        base(spiffe_id="spiffe://example.org/nodes/web", parent_id="", node=True), trust_domain=TD, now=NOW
    )
    assert got.parent_id == SERVER == str(server_id(TD))


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"spiffe_id": ""}, "spiffe_id", "required"),
        ({"spiffe_id": "spiffe://Example.org/web"}, "spiffe_id", "upper-case"),
        ({"spiffe_id": "https://example.org/web"}, "spiffe_id", "spiffe://"),
        ({"spiffe_id": "spiffe://other.org/web"}, "spiffe_id", "not in trust domain example.org"),
        ({"spiffe_id": "spiffe://example.org"}, "spiffe_id", "needs a path"),
        ({"spiffe_id": SERVER}, "spiffe_id", "reserved"),
        ({"spiffe_id": "spiffe://example.org/tessera/agent/join_token/x"}, "spiffe_id", "reserved"),
        ({"parent_id": ""}, "parent_id", "required"),
        ({"parent_id": "spiffe://other.org/tessera/agent/x"}, "parent_id", "not in trust domain"),
        ({"parent_id": SERVER}, "parent_id", "--node"),
        ({"parent_id": "spiffe://example.org/tessera/other"}, "parent_id", "not an agent ID"),
        ({"parent_id": "spiffe://example.org/web"}, "parent_id", "own parent"),
        ({"selectors": ()}, "selectors", "at least one"),
        ({"selectors": (Selector("unix", "uid:1\x00"),)}, "selectors", "control"),
        (
            {"selectors": tuple(Selector("t", str(i)) for i in range(MAX_SELECTORS + 1))},
            "selectors",
            f"at most {MAX_SELECTORS}",
        ),
        ({"x509_svid_ttl": 59}, "x509_svid_ttl", "between 60s"),
        ({"x509_svid_ttl": X509_SVID_TTL_MAX + 1}, "x509_svid_ttl", "between"),
        ({"x509_svid_ttl": -1}, "x509_svid_ttl", "between"),
        ({"x509_svid_ttl": 1.5}, "x509_svid_ttl", "integer"),
        ({"jwt_svid_ttl": JWT_SVID_TTL_MAX + 1}, "jwt_svid_ttl", "between"),
        ({"dns_names": ("bad_name.example.org",)}, "dns_names", "invalid label"),
        ({"dns_names": ("-a.example.org",)}, "dns_names", "invalid label"),
        ({"dns_names": ("a" * 64 + ".org",)}, "dns_names", "invalid label"),
        ({"dns_names": ("a." * 127 + "org",)}, "dns_names", "longer than 253"),
        ({"dns_names": ("10.0.0.1",)}, "dns_names", "IP address"),
        ({"dns_names": ("*.org",)}, "dns_names", "wildcard"),
        ({"dns_names": ("a.*.example.org",)}, "dns_names", "invalid label"),
        ({"dns_names": ("",)}, "dns_names", "empty"),
        ({"hint": "x" * (MAX_HINT_BYTES + 1)}, "hint", "1024 bytes"),
        ({"hint": "é" * 513}, "hint", "1024 bytes"),
        ({"hint": "a\nb"}, "hint", "control"),
        ({"federates_with": ("B.test",)}, "federates_with", "upper-case"),
        ({"federates_with": ("example.org",)}, "federates_with", "own trust domain"),
        ({"federates_with": ("spiffe://b.test/path",)}, "federates_with", "workload ID"),
        ({"expires_at": NOW}, "expires_at", "not in the future"),
        ({"expires_at": NOW - 100}, "expires_at", "not in the future"),
        ({"expires_at": 2**63}, "expires_at", "out of range"),
        ({"id": "has space"}, "id", "not a valid entry id"),
        ({"id": "x" * 129}, "id", "not a valid entry id"),
    ],
)
def test_refusals_name_the_field(changes: dict[str, object], field: str, message: str) -> None:
    refused(base(**changes), field, message)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"x509_svid_ttl": 600}, "x509_svid_ttl"),
        ({"jwt_svid_ttl": 600}, "jwt_svid_ttl"),
        ({"dns_names": ("a.example.org",)}, "dns_names"),
        ({"admin": True}, "admin"),
        ({"downstream": True}, "downstream"),
        ({"federates_with": ("b.test",)}, "federates_with"),
    ],
)
def test_node_alias_entries_refuse_svid_fields(changes: dict[str, object], field: str) -> None:
    refused(
        base(spiffe_id="spiffe://example.org/nodes/web", parent_id=SERVER, node=True, **changes), field, "node alias"
    )


def test_node_alias_parent_must_be_the_server() -> None:
    refused(base(spiffe_id="spiffe://example.org/nodes/web", parent_id=AGENT, node=True), "parent_id", "server")


def test_dns_name_helper_lowercases_and_strips_root_dot() -> None:
    assert validate_dns_name("WWW.Example.org.") == "www.example.org"
    assert validate_dns_name("localhost") == "localhost"
