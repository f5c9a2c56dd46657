"""The smoke run every supported CPython gets (scripts/test-pythons.sh runs it on 3.12 and 3.13 too): a real
tessera-server and tessera-agent under this interpreter, and an ``X509Source`` whose SVID does mutual TLS through
``server_context`` with two clients, ``client_context`` and this Python's ``ssl.create_default_context()``. On
3.13 the default context checks certificate profiles strictly (key identifiers, critical basicConstraints):
what the server issues must pass there, not only in the SDK's own contexts (which are strict everywhere)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from support.mtls_probe import handshake
from support.stack import HostStack, host_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack() -> Iterator[HostStack]:
    with host_stack(prefix="tsm-") as s:
        yield s


def test_an_x509_source_does_mutual_tls_with_the_sdk_and_the_default_context(stack: HostStack) -> None:
    seen = handshake(stack.address)
    assert seen["spiffe_id"] == stack.spiffe_id
    for client in ("sdk_client", "default_context_client"):
        side = seen[client]
        assert isinstance(side, dict)
        assert side["server_saw"] == side["client_saw"] == stack.spiffe_id, client
        assert side["reply"] == "ok"
        assert side["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert seen["python"] == ".".join(map(str, sys.version_info[:3]))
    # What 3.13 changed: there the default context is strict, and the chain above passed it.
    assert seen["default_verify_strict"] == (sys.version_info >= (3, 13))
