"""The Workload API's answers: one ordered table from the agent's errors to gRPC status codes (SPIFFE.md section 2).

The servicer (and the stream cap of the metrics interceptor) raises; :data:`WORKLOAD_API_STATUS` answers. What
each code tells a workload: INVALID_ARGUMENT is its own mistake and never retried; PERMISSION_DENIED means it
has no identity here (it retries with backoff); UNAVAILABLE means not now (retry); RESOURCE_EXHAUSTED means it
holds too many streams. The metrics count attestation failures by these codes and messages (agent/metrics.py).
"""

from __future__ import annotations

import logging

import grpc

from tessera._daemon.status import Rule, StatusTable
from tessera.agent.errors import (
    CallerRefused,
    InvalidRequestError,
    NoIdentityError,
    NotReadyError,
    StreamLimitExceeded,
    WorkloadAttestationError,
)
from tessera.sdk.errors import SvidError, VerificationError

# Most specific first: the first matching class decides.
WORKLOAD_API_STATUS = StatusTable(
    (
        Rule(InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
        # A JWT-SVID to validate that is malformed or does not validate: the SDK's validator says which rule failed.
        Rule(SvidError, grpc.StatusCode.INVALID_ARGUMENT),
        Rule(VerificationError, grpc.StatusCode.INVALID_ARGUMENT),
        Rule(CallerRefused, grpc.StatusCode.PERMISSION_DENIED),
        Rule(NoIdentityError, grpc.StatusCode.PERMISSION_DENIED),
        Rule(WorkloadAttestationError, grpc.StatusCode.UNAVAILABLE, "workload attestation failed: "),
        Rule(NotReadyError, grpc.StatusCode.UNAVAILABLE),
        Rule(StreamLimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ),
    logging.getLogger("tessera.agent.endpoint"),
    internal_message="internal error (see the agent's log)",
)
