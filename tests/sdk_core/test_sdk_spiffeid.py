"""SPIFFE ID and trust domain parsing: every rule of the SPIFFE ID standard, valid and invalid."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.spiffeid import MAX_SPIFFE_ID_LENGTH, MAX_TRUST_DOMAIN_LENGTH, SpiffeId, TrustDomain, parse_ids

TD_CHARS = string.ascii_lowercase + string.digits + ".-_"
PATH_CHARS = string.ascii_letters + string.digits + ".-_"


# ----------------------------------------------------------------------------------------------- valid


@pytest.mark.parametrize(
    ("text", "td", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/workload", "example.org", "/workload"),
        ("spiffe://example.org/ns/prod/sa/web", "example.org", "/ns/prod/sa/web"),
        ("spiffe://a", "a", ""),
        ("spiffe://my_domain-1.example.org/x", "my_domain-1.example.org", "/x"),
        ("spiffe://0.1.2.3/x", "0.1.2.3", "/x"),  # looks like an IPv4 address but is just allowed characters
        ("spiffe://example.org/UPPER/Case", "example.org", "/UPPER/Case"),  # paths are case-sensitive
        ("spiffe://example.org/.path", "example.org", "/.path"),
        ("spiffe://example.org/..path", "example.org", "/..path"),
        ("spiffe://example.org/...", "example.org", "/..."),
        ("spiffe://example.org/a.b/c..d/e...", "example.org", "/a.b/c..d/e..."),
        ("spiffe://example.org/-_.", "example.org", "/-_."),
    ],
)
def test_valid_ids(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid


def test_every_allowed_character() -> None:
    sid = SpiffeId.parse(f"spiffe://{TD_CHARS}/{PATH_CHARS}")
    assert sid.trust_domain.name == TD_CHARS
    assert sid.segments == (PATH_CHARS,)


# ----------------------------------------------------------------------------------------------- invalid


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("example.org/workload", "must start with 'spiffe://'"),
        ("https://example.org/workload", "must start with 'spiffe://'"),
        ("spiffe:/example.org/workload", "must start with 'spiffe://'"),
        ("spiffe:example.org", "must start with 'spiffe://'"),
        ("//example.org/workload", "must start with 'spiffe://'"),
        ("SPIFFE://example.org/workload", "lower case"),
        ("Spiffe://example.org/workload", "lower case"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe:///workload", "trust domain is missing"),
        ("spiffe://Example.org/workload", "upper-case"),
        ("spiffe://EXAMPLE.ORG", "upper-case"),
        ("spiffe://example.org:8443/workload", "port"),
        ("spiffe://example.org:/workload", "port"),
        ("spiffe://user@example.org/workload", "userinfo"),
        ("spiffe://user:pass@example.org/workload", "port|userinfo"),
        ("spiffe://exa%6Dple.org/workload", "percent-encoded"),
        ("spiffe://[::1]/workload", "IP-literal"),
        ("spiffe://[2001:db8::1]", "IP-literal"),
        ("spiffe://exa mple.org", "character ' '"),
        ("spiffe://example.org\n", "character '\\\\n'"),
        ("spiffe://exämple.org/x", "character|upper"),
        ("spiffe://example.org/", "trailing '/'"),
        ("spiffe://example.org/workload/", "trailing '/'"),
        ("spiffe://example.org//workload", "empty segment"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/.", "dot segments"),
        ("spiffe://example.org/..", "dot segments"),
        ("spiffe://example.org/a/./b", "dot segments"),
        ("spiffe://example.org/a/../b", "dot segments"),
        ("spiffe://example.org/work%20load", "percent-encoded"),
        ("spiffe://example.org/%2e", "percent-encoded"),
        ("spiffe://example.org/workload?x=1", "query or fragment"),
        ("spiffe://example.org/workload#frag", "query or fragment"),
        ("spiffe://example.org?x=1", "query or fragment"),
        ("spiffe://example.org#frag", "query or fragment"),
        ("spiffe://example.org/a b", "character ' '"),
        ("spiffe://example.org/a:b", "character ':'"),
        ("spiffe://example.org/a@b", "character '@'"),
        ("spiffe://example.org/a+b", "character '\\+'"),
        ("spiffe://example.org/caf\u00e9", "character"),
        ("spiffe://example.org/a\\b", "character"),
    ],
)
def test_invalid_ids(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        SpiffeId.parse(text)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse("nope")


# ----------------------------------------------------------------------------------------------- length limits


def test_trust_domain_length_limit() -> None:
    name = "a" * MAX_TRUST_DOMAIN_LENGTH
    assert MAX_TRUST_DOMAIN_LENGTH == 255
    assert TrustDomain(name).name == name
    assert SpiffeId.parse(f"spiffe://{name}/x").trust_domain.name == name
    with pytest.raises(SpiffeIdError, match="longer than 255 bytes"):
        TrustDomain(name + "a")
    with pytest.raises(SpiffeIdError, match="longer than 255 bytes"):
        SpiffeId.parse(f"spiffe://{name}a/x")


def test_spiffe_id_length_limit() -> None:
    assert MAX_SPIFFE_ID_LENGTH == 2048
    prefix = "spiffe://example.org/"
    exact = prefix + "a" * (MAX_SPIFFE_ID_LENGTH - len(prefix))
    assert len(exact) == 2048
    assert str(SpiffeId.parse(exact)) == exact
    with pytest.raises(SpiffeIdError, match="longer than 2048 bytes"):
        SpiffeId.parse(exact + "a")
    segments = ["a" * 100] * 20 + ["b" * 100]
    with pytest.raises(SpiffeIdError, match="longer than 2048 bytes"):
        TrustDomain("example.org").spiffe_id(*segments)


# ----------------------------------------------------------------------------------------------- trust domains


@pytest.mark.parametrize(
    ("text", "name"),
    [("example.org", "example.org"), ("spiffe://example.org", "example.org"), ("a-b_c.d", "a-b_c.d")],
)
def test_trust_domain_parse(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert td.id_string == f"spiffe://{name}"
    assert str(td) == name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing"),
        ("Example.org", "upper-case"),
        ("example.org:80", "port"),
        ("user@example.org", "userinfo"),
        ("ex%41mple.org", "percent"),
        ("spiffe://example.org/workload", "workload ID, not a trust domain"),
        ("SPIFFE://example.org", "lower case"),
        ("example.org/path", "character '/'"),
        ("[::1]", "character '\\['"),
    ],
)
def test_trust_domain_invalid(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        TrustDomain.parse(text)


# ----------------------------------------------------------------------------------------------- building and comparing


def test_from_segments() -> None:
    td = TrustDomain("example.org")
    sid = td.spiffe_id("ns", "prod", ".hidden")
    assert str(sid) == "spiffe://example.org/ns/prod/.hidden"
    assert sid.segments == ("ns", "prod", ".hidden")
    assert SpiffeId.from_segments("example.org", "x") == SpiffeId.parse("spiffe://example.org/x")
    assert td.spiffe_id() == SpiffeId.parse("spiffe://example.org")
    assert td.spiffe_id().segments == ()


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        ("a/b", "contains '/'"),
        ("", "empty segment"),
        (".", "dot segments"),
        ("..", "dot segments"),
        ("a%20", "percent"),
    ],
)
def test_from_segments_invalid(segment: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        TrustDomain("example.org").spiffe_id(segment)


def test_direct_construction_validates() -> None:
    with pytest.raises(SpiffeIdError, match="must start with '/'"):
        SpiffeId(TrustDomain("example.org"), "relative")
    with pytest.raises(SpiffeIdError, match="upper-case"):
        TrustDomain("Example.org")


def test_comparison_membership_and_hashing() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    assert a == SpiffeId.parse("spiffe://example.org/a")
    assert a != SpiffeId.parse("spiffe://example.org/A")  # paths are case-sensitive
    assert a != SpiffeId.parse("spiffe://example.org/a/b")
    assert len({a, SpiffeId.parse("spiffe://example.org/a")}) == 1
    assert a.member_of(TrustDomain("example.org"))
    assert a.member_of("example.org")
    assert not a.member_of(TrustDomain("example.com"))
    assert not SpiffeId.parse("spiffe://example.org.evil/a").member_of("example.org")
    assert a.is_workload_id() and not SpiffeId.parse("spiffe://example.org").is_workload_id()
    assert sorted([SpiffeId.parse("spiffe://b/x"), SpiffeId.parse("spiffe://a/y")])[0].trust_domain.name == "a"
    assert parse_ids(["spiffe://a/x", "spiffe://b"]) == [SpiffeId.parse("spiffe://a/x"), SpiffeId.parse("spiffe://b")]


# ----------------------------------------------------------------------------------------------- properties

td_names = st.text(alphabet=TD_CHARS, min_size=1, max_size=40)
segments = st.text(alphabet=PATH_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@given(td_names, st.lists(segments, max_size=6))
def test_valid_ids_round_trip(td: str, segs: list[str]) -> None:
    sid = TrustDomain(td).spiffe_id(*segs)
    assert SpiffeId.parse(str(sid)) == sid
    assert sid.segments == tuple(segs)


@given(st.text(max_size=60))
def test_arbitrary_text_only_raises_spiffe_id_error(text: str) -> None:
    try:
        sid = SpiffeId.parse("spiffe://" + text)
    except SpiffeIdError:
        return
    # Anything accepted uses only the allowed characters and re-serialises to itself.
    assert str(sid) == "spiffe://" + text
    assert set(sid.trust_domain.name) <= set(TD_CHARS)
    assert set(sid.path) <= set(PATH_CHARS + "/")
