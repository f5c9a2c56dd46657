"""What the sync and asyncio Workload API clients share: errors, response decoding and retry pacing.

Everything here is pure (no sockets, no clock of its own), so both clients decode a response and map a
gRPC status the same way, and the decoding rules are tested without a server.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from tessera.proto import workload_pb2 as pb
from tessera.sdk.bundle import BundleSet, JwtBundle, X509Bundle
from tessera.sdk.errors import TesseraError, WorkloadApiError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.workloadapi.wire import ENDPOINT_SOCKET_ENV, endpoint_to_target


class WorkloadApiUnavailableError(WorkloadApiError):
    """The agent could not be reached or is not ready yet (retried by watchers)."""


class WorkloadApiPermissionDeniedError(WorkloadApiError):
    """The agent has no identity for this process (retried by watchers: one may be registered later)."""


class WorkloadApiInvalidArgumentError(WorkloadApiError):
    """The agent refused the request itself; retrying cannot help, so watchers stop on it."""


class WorkloadApiResponseError(WorkloadApiError):
    """The agent answered with something that is not a valid SVID, bundle or token."""


class WorkloadApiTimeoutError(WorkloadApiError):
    """Nothing usable arrived from the agent within the allowed time."""


class WorkloadApiClosedError(WorkloadApiError):
    """The client, watch or source was closed."""


class WorkloadApiStreamEndedError(WorkloadApiError):
    """The agent ended an update stream without an error status; a correct agent never does, so it is
    treated as a broken connection and the watch reconnects."""


def resolve_address(address: str | None) -> tuple[str, str]:
    """Returns (address as given, gRPC target), taking ``SPIFFE_ENDPOINT_SOCKET`` when no address is given."""
    if not address:
        address = os.environ.get(ENDPOINT_SOCKET_ENV, "")
    if not address:
        raise WorkloadApiError(
            f"no Workload API address: pass address='unix:///path/to/api.sock' or set {ENDPOINT_SOCKET_ENV}"
        )
    try:
        return address, endpoint_to_target(address)
    except ValueError as exc:
        raise WorkloadApiError(str(exc)) from None


def channel_options(backoff: BackoffPolicy) -> list[tuple[str, int]]:
    """Keeps gRPC's own reconnect pacing in step with ours, so a restarted agent is found as soon as our
    backoff says to try (gRPC's default would wait up to two minutes between connection attempts)."""
    initial_ms = max(1, int(backoff.initial * 1000))
    return [
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.min_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(backoff.maximum * 1000))),
        ("grpc.enable_retries", 0),
    ]


def error_from_rpc(exc: grpc.RpcError, rpc_name: str, address: str) -> WorkloadApiError:
    """Turns a gRPC failure into the SDK error that says what the caller can do about it."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or "no details"
    where = f"Workload API {rpc_name} at {address}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return WorkloadApiInvalidArgumentError(f"{where} refused the request: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return WorkloadApiPermissionDeniedError(
            f"{where}: no identity for this process ({details}); is a registration entry matching it?"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkloadApiUnavailableError(f"{where} is unavailable ({details}); is the agent running?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkloadApiTimeoutError(f"{where} did not answer in time ({details})")
    if code == grpc.StatusCode.CANCELLED:
        return WorkloadApiClosedError(f"{where} was cancelled")
    name = code.name if code is not None else "UNKNOWN"
    return WorkloadApiError(f"{where} failed with {name}: {details}")


@dataclass(frozen=True, slots=True)
class X509Context:
    """One complete X.509 update from the agent: this workload's SVIDs (the first is the default) and
    every X.509 bundle it may trust (its own trust domain's and federated ones), taken together so they
    never mismatch."""

    svids: tuple[X509Svid, ...]
    bundles: BundleSet[X509Bundle]
    crls: tuple[bytes, ...] = ()
    """DER CRLs the agent passed on (revoked SVIDs of its trust domain); TLS contexts refuse what they list."""

    @property
    def default_svid(self) -> X509Svid:
        return self.svids[0]


def _trust_domain_key(key: str) -> TrustDomain:
    try:
        return TrustDomain.parse(key)
    except TesseraError as exc:
        raise WorkloadApiResponseError(f"bundle map key {key!r} is not a trust domain: {exc}") from None


def decode_x509_svid_response(resp: pb.X509SVIDResponse) -> X509Context:
    if not resp.svids:
        raise WorkloadApiResponseError("X509SVIDResponse has no SVIDs")
    svids: list[X509Svid] = []
    bundles: dict[TrustDomain, X509Bundle] = {}
    for item in resp.svids:
        try:
            svid = X509Svid.parse_der(item.x509_svid, item.x509_svid_key, hint=item.hint)
            declared = SpiffeId.parse(item.spiffe_id)
        except TesseraError as exc:
            raise WorkloadApiResponseError(
                f"X509SVIDResponse carries an invalid SVID {item.spiffe_id!r}: {exc}"
            ) from None
        if svid.spiffe_id != declared:
            raise WorkloadApiResponseError(
                f"X509SVIDResponse says {declared} but the certificate is for {svid.spiffe_id}"
            )
        if not item.bundle:
            raise WorkloadApiResponseError(f"X509SVIDResponse has an empty bundle for {declared}")
        td = declared.trust_domain
        if td not in bundles:
            try:
                bundles[td] = X509Bundle.parse_der(td, item.bundle)
            except TesseraError as exc:
                raise WorkloadApiResponseError(f"X509SVIDResponse has an invalid bundle for {td}: {exc}") from None
        svids.append(svid)
    for key, der in resp.federated_bundles.items():
        td = _trust_domain_key(key)
        if td in bundles:
            continue  # the SVID's own bundle wins over a federated copy of the same trust domain
        try:
            bundles[td] = X509Bundle.parse_der(td, der)
        except TesseraError as exc:
            raise WorkloadApiResponseError(f"federated bundle for {td} is invalid: {exc}") from None
    return X509Context(svids=tuple(svids), bundles=BundleSet(bundles.values()), crls=tuple(resp.crl))


def decode_x509_bundles_response(resp: pb.X509BundlesResponse) -> BundleSet[X509Bundle]:
    bundles: list[X509Bundle] = []
    for key, der in resp.bundles.items():
        td = _trust_domain_key(key)
        try:
            bundles.append(X509Bundle.parse_der(td, der))
        except TesseraError as exc:
            raise WorkloadApiResponseError(f"X.509 bundle for {td} is invalid: {exc}") from None
    if not bundles:
        raise WorkloadApiResponseError("X509BundlesResponse has no bundles")
    return BundleSet(bundles)


def decode_jwt_bundles_response(resp: pb.JWTBundlesResponse) -> BundleSet[JwtBundle]:
    bundles: dict[TrustDomain, JwtBundle] = {}
    for key, jwks in resp.bundles.items():
        td = _trust_domain_key(key)
        try:
            bundles[td] = JwtBundle.from_jwks(td, jwks)
        except TesseraError as exc:
            raise WorkloadApiResponseError(f"JWT bundle for {td} is invalid: {exc}") from None
    if not bundles:
        raise WorkloadApiResponseError("JWTBundlesResponse has no bundles")
    return BundleSet(bundles.values())


def decode_jwt_svid_response(resp: pb.JWTSVIDResponse, audiences: tuple[str, ...]) -> list[JwtSvid]:
    if not resp.svids:
        raise WorkloadApiResponseError("JWTSVIDResponse has no SVIDs")
    out: list[JwtSvid] = []
    for item in resp.svids:
        try:
            svid = JwtSvid.parse_insecure(item.svid, audiences, hint=item.hint)
        except TesseraError as exc:
            raise WorkloadApiResponseError(f"JWT-SVID for {item.spiffe_id!r} is invalid: {exc}") from None
        if str(svid.spiffe_id) != item.spiffe_id:
            raise WorkloadApiResponseError(
                f"JWTSVIDResponse says {item.spiffe_id} but the token's subject is {svid.spiffe_id}"
            )
        out.append(svid)
    return out


def decode_validate_response(resp: pb.ValidateJWTSVIDResponse, token: str, audience: str) -> JwtSvid:
    """The agent has checked signature, expiry and audience; we parse the token to hand back its claims and
    refuse an answer that names a different subject than the token."""
    try:
        svid = JwtSvid.parse_insecure(token, (audience,))
    except TesseraError as exc:
        raise WorkloadApiResponseError(f"the agent validated a token this SDK cannot parse: {exc}") from None
    if str(svid.spiffe_id) != resp.spiffe_id:
        raise WorkloadApiResponseError(
            f"ValidateJWTSVID answered {resp.spiffe_id!r} for a token whose subject is {svid.spiffe_id}"
        )
    return svid


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential backoff with jitter for reconnecting watches: the first retry after ``initial``
    seconds, each next one ``multiplier`` times longer up to ``maximum``, each spread by +/- ``jitter``
    (a fraction) so a fleet of workloads does not reconnect in lock-step after an agent restart."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs 0 < initial <= maximum, multiplier >= 1 and 0 <= jitter < 1")

    def start(self, rng: Callable[[], float] = random.random) -> Backoff:
        return Backoff(self, rng)


@dataclass(slots=True)
class Backoff:
    policy: BackoffPolicy
    rng: Callable[[], float]
    _attempt: int = field(default=0)

    def next_delay(self) -> float:
        base = min(self.policy.maximum, self.policy.initial * self.policy.multiplier**self._attempt)
        if base < self.policy.maximum:
            self._attempt += 1
        spread = base * self.policy.jitter
        return max(0.0, base - spread + 2 * spread * self.rng())

    def reset(self) -> None:
        self._attempt = 0


def is_final(error: WorkloadApiError) -> bool:
    """Whether a watch must stop on this error instead of reconnecting."""
    return isinstance(error, WorkloadApiInvalidArgumentError | WorkloadApiClosedError)
