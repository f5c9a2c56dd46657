"""The Workload API's status table (agent/endpoint/status.py): each of the agent's refusals gets the code SPIFFE.md
section 2 gives its meaning, with the message the workload (and the agent's metrics) read."""

from __future__ import annotations

import grpc
import pytest

from tessera.agent.endpoint.status import WORKLOAD_API_STATUS
from tessera.agent.errors import (
    AgentError,
    CallerRefused,
    InvalidRequestError,
    NoIdentityError,
    NotReadyError,
    StreamLimitExceeded,
    WorkloadAttestationError,
)
from tessera.agent.metrics import _failure_reason
from tessera.sdk.errors import SvidError, TesseraError, VerificationError

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("error", "code", "message", "reason"),
    [
        (
            InvalidRequestError("security header missing from request"),
            S.INVALID_ARGUMENT,
            None,
            "missing_security_header",
        ),
        (SvidError("JWT-SVID has no 'sub' claim"), S.INVALID_ARGUMENT, None, None),
        (VerificationError("JWT-SVID has expired"), S.INVALID_ARGUMENT, None, None),
        (CallerRefused("the process that connected has exec'd"), S.PERMISSION_DENIED, None, "caller_changed"),
        (NoIdentityError("no identity issued to this workload"), S.PERMISSION_DENIED, None, "no_identity"),
        (
            WorkloadAttestationError("process 42 has exited"),
            S.UNAVAILABLE,
            "workload attestation failed: process 42 has exited",
            "attestation_error",
        ),
        (NotReadyError("caller could not be identified; retry"), S.UNAVAILABLE, None, "unidentified_caller"),
        (NotReadyError("agent is shutting down"), S.UNAVAILABLE, None, None),
        (StreamLimitExceeded(1000, 2), S.RESOURCE_EXHAUSTED, None, "stream_limit"),
        # Not a refusal the servicer means: a bug, whatever it says.
        (AgentError("server refused: UNAVAILABLE"), S.INTERNAL, "internal error (see the agent's log)", None),
        (KeyError("x"), S.INTERNAL, "internal error (see the agent's log)", None),
    ],
)
def test_each_refusal_has_its_code_and_message(
    error: Exception, code: grpc.StatusCode, message: str | None, reason: str | None
) -> None:
    got_code, got_message = WORKLOAD_API_STATUS.status_for(error)
    assert got_code == code
    assert got_message == (str(error) if message is None else message)
    assert _failure_reason(got_code.name, got_message) == reason


def test_every_error_the_table_names_is_in_the_one_tree() -> None:
    for rule in WORKLOAD_API_STATUS.rules:
        assert issubclass(rule.error, TesseraError), rule.error
