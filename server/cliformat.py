"""How the admin commands print API messages as JSON (``--output json``): one rule for every message.

- Every field appears under its proto name: the JSON an operator scripts against is the wire's own vocabulary,
  and a field added to a message appears without a formatter to update.
- Numbers stay numbers and lists stay lists (protobuf's ``json_format`` would quote 64-bit integers and use
  camelCase names, which would change what scripts already read).
- A selector, the one nested message the commands print, is its ``type:value`` text, as operators type it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from tessera.proto import node_pb2 as npb


def selector_texts(selectors: Sequence[npb.Selector]) -> list[str]:
    return [f"{s.type}:{s.value}" for s in selectors]


def message_to_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is npb.Selector.DESCRIPTOR:
            value = selector_texts(value)
        elif field.message_type is not None:
            raise TypeError(f"{message.DESCRIPTOR.name}.{field.name}: no JSON form for {field.message_type.name}")
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out
