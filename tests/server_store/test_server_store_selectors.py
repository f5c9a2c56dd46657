"""Selector parsing and matching (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.server.errors import SelectorError
from tessera.server.selectors import (
    MAX_TYPE_LENGTH,
    MAX_VALUE_LENGTH,
    Selector,
    check_selector,
    matches,
    normalize,
)


def test_splits_on_the_first_colon_only() -> None:
    s = Selector.parse("unix:uid:1000")
    assert (s.type, s.value) == ("unix", "uid:1000")
    assert str(s) == "unix:uid:1000"
    assert Selector.parse("k8s:pod-label:app:web") == Selector("k8s", "pod-label:app:web")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("unix", "no ':'"),
        (":uid:1000", "empty type"),
        ("unix:", "empty value"),
        ("", "no ':'"),
    ],
)
def test_malformed_selectors_are_refused(text: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        Selector.parse(text)


def test_constructor_refuses_what_parse_would() -> None:
    with pytest.raises(SelectorError, match="empty type"):
        Selector("", "x")
    with pytest.raises(SelectorError, match="empty value"):
        Selector("unix", "")
    with pytest.raises(SelectorError, match="contains ':'"):
        Selector("unix:uid", "1")


def test_bounds_and_control_characters() -> None:
    check_selector(Selector("t" * MAX_TYPE_LENGTH, "v" * MAX_VALUE_LENGTH))
    with pytest.raises(SelectorError, match="type"):
        check_selector(Selector("t" * (MAX_TYPE_LENGTH + 1), "v"))
    with pytest.raises(SelectorError, match="value longer"):
        check_selector(Selector("t", "v" * (MAX_VALUE_LENGTH + 1)))
    with pytest.raises(SelectorError, match="control"):
        check_selector(Selector("unix", "uid:1\n"))
    with pytest.raises(SelectorError, match="whitespace"):
        check_selector(Selector("unix", " uid:1"))


def parse_selectors(texts: list[str]) -> tuple[Selector, ...]:
    return normalize(Selector.parse(t) for t in texts)


def test_normalize_sorts_and_deduplicates() -> None:
    got = parse_selectors(["unix:uid:1", "k8s:ns:a", "unix:uid:1", "unix:gid:2"])
    assert got == (Selector("k8s", "ns:a"), Selector("unix", "gid:2"), Selector("unix", "uid:1"))
    assert normalize(reversed(got)) == got


def test_matching_is_subset() -> None:
    entry = parse_selectors(["unix:uid:1000", "unix:gid:1000"])
    assert matches(entry, parse_selectors(["unix:uid:1000", "unix:gid:1000", "unix:user:web"]))
    assert matches(entry, set(entry))
    assert not matches(entry, parse_selectors(["unix:uid:1000"]))
    assert not matches(entry, [])
    # An entry without selectors matches nobody.
    assert not matches([], parse_selectors(["unix:uid:1000"]))


_part = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)


@settings(deadline=None)
@given(_part.filter(lambda t: ":" not in t), _part)
def test_parse_round_trips(selector_type: str, value: str) -> None:
    s = Selector(selector_type, value)
    assert Selector.parse(str(s)) == s


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("xyz")), max_size=6), st.data())
def test_matches_agrees_with_set_inclusion(pairs: list[tuple[str, str]], data: st.DataObject) -> None:
    available = {Selector(t, v) for t, v in pairs}
    required = data.draw(st.sets(st.sampled_from([Selector(t, v) for t in "abc" for v in "xyz"]), max_size=4))
    assert matches(required, available) == (bool(required) and required <= available)
