"""`--output json` of the admin commands: every message through one rule, with the names and types scripts read."""

from __future__ import annotations

import json

import pytest

from tessera.proto import admin_pb2 as apb
from tessera.proto import node_pb2 as npb
from tessera.server.cliformat import message_to_dict


def test_entries_print_every_field_with_numbers_as_numbers() -> None:
    entry = npb.Entry(
        id="e1",
        spiffe_id="spiffe://example.org/web",
        parent_id="spiffe://example.org/tessera/agent/x",
        selectors=[npb.Selector(type="unix", value="uid:1000"), npb.Selector(type="k8s", value="ns:a")],
        dns_names=["web.example.org"],
        federates_with=["b.test"],
        expires_at=4070908800,
        node=True,
    )
    printed = json.loads(json.dumps(message_to_dict(entry)))
    assert printed == {
        "id": "e1",
        "spiffe_id": "spiffe://example.org/web",
        "parent_id": "spiffe://example.org/tessera/agent/x",
        "selectors": ["unix:uid:1000", "k8s:ns:a"],
        "x509_svid_ttl": 0,
        "jwt_svid_ttl": 0,
        "dns_names": ["web.example.org"],
        "hint": "",
        "admin": False,
        "downstream": False,
        "federates_with": ["b.test"],
        "expires_at": 4070908800,  # json_format would print "4070908800"
        "revision": 0,
        "created_at": 0,
        "node": True,
    }


def test_ca_slots_keep_the_wire_name_key_id() -> None:
    slot = apb.CASlot(kind="jwt", state="old", key_id="ab12", not_before=1, not_after=2, key_type="ec-p256")
    assert message_to_dict(slot) == {
        "kind": "jwt",
        "state": "old",
        "key_id": "ab12",
        "not_before": 1,
        "not_after": 2,
        "key_type": "ec-p256",
        "tainted": False,
    }
    agent = apb.Agent(spiffe_id="spiffe://example.org/a", node_selectors=[npb.Selector(type="x509pop", value="cn:h")])
    assert message_to_dict(agent)["node_selectors"] == ["x509pop:cn:h"]


def test_a_nested_message_without_a_json_form_is_refused() -> None:
    with pytest.raises(TypeError, match="no JSON form"):
        message_to_dict(apb.GetCAResponse(slots=[apb.CASlot()]))
