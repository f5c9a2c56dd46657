"""Selectors: the ``type:value`` facts that attestation yields and registration entries require.

Pure logic, no I/O. A selector is written ``type:value`` and split on the *first* colon only, because values
routinely contain colons (``unix:uid:1000`` is type ``unix``, value ``uid:1000``). An entry matches a caller
when every one of the entry's selectors is among the caller's (subset semantics): an entry with more
selectors is more specific, never less.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tessera.server.errors import SelectorError

MAX_TYPE_LENGTH = 128
"""Bytes; selector types are short names like ``unix`` or ``k8s``."""

MAX_VALUE_LENGTH = 2048
"""Bytes; long enough for image digests and k8s label pairs, short enough to index."""


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """One ``type:value`` selector. Ordering is (type, value), which is the canonical order of entries' sets."""

    type: str
    value: str

    def __post_init__(self) -> None:
        if not self.type:
            raise SelectorError(f"selector with value {self.value!r} has an empty type")
        if ":" in self.type:
            raise SelectorError(f"selector type {self.type!r} contains ':'; the type ends at the first ':'")
        if not self.value:
            raise SelectorError(f"selector {self.type!r} has an empty value (write it as type:value)")

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parses ``type:value`` (split on the first colon)."""
        selector_type, sep, value = text.partition(":")
        if not sep:
            raise SelectorError(f"selector {text!r} has no ':'; write it as type:value (e.g. unix:uid:1000)")
        if not selector_type:
            raise SelectorError(f"selector {text!r} has an empty type; write it as type:value")
        if not value:
            raise SelectorError(f"selector {text!r} has an empty value; write it as type:value")
        return cls(selector_type, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def normalize(selectors: Iterable[Selector]) -> tuple[Selector, ...]:
    """The canonical form of a selector set: sorted by (type, value), without duplicates."""
    return tuple(sorted(set(selectors)))


def check_selector(selector: Selector) -> None:
    """Enforces the bounds that make a selector safe to store and index (beyond well-formedness)."""
    if len(selector.type.encode()) > MAX_TYPE_LENGTH:
        raise SelectorError(f"selector type {selector.type[:40]!r}... is longer than {MAX_TYPE_LENGTH} bytes")
    if len(selector.value.encode()) > MAX_VALUE_LENGTH:
        raise SelectorError(f"selector {selector.type}:... has a value longer than {MAX_VALUE_LENGTH} bytes")
    for part, name in ((selector.type, "type"), (selector.value, "value")):
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in part):
            raise SelectorError(f"selector {selector.type}:... has a control character in its {name}")
        if part != part.strip():
            raise SelectorError(f"selector {selector} has leading or trailing whitespace in its {name}")


def matches(required: Iterable[Selector], available: Iterable[Selector]) -> bool:
    """True when every required selector (an entry's) is among the available ones (a caller's).

    An empty requirement never matches: an entry without selectors would otherwise match everyone.
    """
    required_set = set(required)
    if not required_set:
        return False
    available_set = available if isinstance(available, (set, frozenset)) else set(available)
    return required_set <= available_set
