"""Workload API client for workloads, and the wire mapping shared with the agent."""

from tessera.sdk.workloadapi.aio import AsyncWorkloadApiClient
from tessera.sdk.workloadapi.client import Watch, WorkloadApiClient
from tessera.sdk.workloadapi.common import (
    BackoffPolicy,
    WorkloadApiClosedError,
    WorkloadApiInvalidArgumentError,
    WorkloadApiPermissionDeniedError,
    WorkloadApiResponseError,
    WorkloadApiStreamEndedError,
    WorkloadApiTimeoutError,
    WorkloadApiUnavailableError,
    X509Context,
)

__all__ = [
    "AsyncWorkloadApiClient",
    "BackoffPolicy",
    "Watch",
    "WorkloadApiClient",
    "WorkloadApiClosedError",
    "WorkloadApiInvalidArgumentError",
    "WorkloadApiPermissionDeniedError",
    "WorkloadApiResponseError",
    "WorkloadApiStreamEndedError",
    "WorkloadApiTimeoutError",
    "WorkloadApiUnavailableError",
    "X509Context",
]
