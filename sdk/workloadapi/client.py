"""Synchronous Workload API client: one-shot fetches and watches that keep a workload's identity current.

Watches run on a background thread each and reconnect on their own (exponential backoff with jitter) for
every failure except InvalidArgument, which means the request itself is wrong and a retry cannot help. An
agent that ends a stream without an error is a broken connection too: a correct agent never does that, so
it is reported to ``on_error`` and the watch reconnects instead of falling silent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from tessera.proto import workload_pb2 as pb
from tessera.sdk.bundle import BundleSet, JwtBundle, X509Bundle
from tessera.sdk.errors import WorkloadApiError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.svid import X509Svid
from tessera.sdk.workloadapi.common import (
    BackoffPolicy,
    WorkloadApiClosedError,
    WorkloadApiResponseError,
    WorkloadApiStreamEndedError,
    X509Context,
    channel_options,
    decode_jwt_bundles_response,
    decode_jwt_svid_response,
    decode_validate_response,
    decode_x509_bundles_response,
    decode_x509_svid_response,
    error_from_rpc,
    is_final,
    resolve_address,
)
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

log = logging.getLogger(__name__)

T = TypeVar("T")
ErrorCallback = Callable[[WorkloadApiError], None]


class Watch:
    """Handle on a running watch: ``cancel()`` stops it, ``wait()`` blocks until it has stopped, and
    ``error`` holds the error that stopped it on its own (InvalidArgument), if any."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self.error: WorkloadApiError | None = None
        self._thread: threading.Thread | None = None

    @property
    def stopped(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """True when the watch has stopped."""
        return self._done.wait(timeout)

    def _set_call(self, call: Any) -> bool:
        with self._lock:
            self._call = call
            return not self._stop.is_set()


def _report(on_error: ErrorCallback | None, error: WorkloadApiError, name: str) -> None:
    if on_error is None:
        log.warning("%s: %s", name, error)
        return
    try:
        on_error(error)
    except Exception:
        log.exception("%s: error callback raised", name)


class WorkloadApiClient:
    """Client for the SPIFFE Workload API served by the local agent.

    ``address`` is ``unix:///path/to/api.sock`` (or ``unix:/path``); without it ``SPIFFE_ENDPOINT_SOCKET``
    is used. ``timeout`` bounds each one-shot fetch. Safe to share across threads; ``close()`` stops every
    watch started from it.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self.address, self._target = resolve_address(address)
        self._timeout = timeout
        self._backoff = backoff or BackoffPolicy()
        self._channel = grpc.insecure_channel(self._target, options=channel_options(self._backoff))
        self._stub = WorkloadApiStub(self._channel)
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._closed = False

    # -- one-shot fetches ------------------------------------------------------------------------------

    def _first(self, rpc_name: str, request: Any, decode: Callable[[Any], T]) -> T:
        self._check_open()
        call = getattr(self._stub, rpc_name)(request, metadata=SECURITY_METADATA, timeout=self._timeout)
        try:
            resp = next(call)
        except StopIteration:
            raise WorkloadApiStreamEndedError(
                f"Workload API {rpc_name} at {self.address} ended the stream before sending anything"
            ) from None
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, rpc_name, self.address) from None
        finally:
            call.cancel()
        return decode(resp)

    def _unary(self, rpc_name: str, request: Any) -> Any:
        self._check_open()
        try:
            return getattr(self._stub, rpc_name)(request, metadata=SECURITY_METADATA, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, rpc_name, self.address) from None

    def fetch_x509_context(self) -> X509Context:
        """This workload's X509-SVIDs (default first) and the X.509 bundles it trusts, as one snapshot."""
        return self._first("FetchX509SVID", pb.X509SVIDRequest(), decode_x509_svid_response)

    def fetch_x509_svids(self) -> list[X509Svid]:
        return list(self.fetch_x509_context().svids)

    def fetch_x509_svid(self) -> X509Svid:
        """The default X509-SVID (the first the agent lists)."""
        return self.fetch_x509_context().default_svid

    def fetch_x509_bundles(self) -> BundleSet[X509Bundle]:
        return self._first("FetchX509Bundles", pb.X509BundlesRequest(), decode_x509_bundles_response)

    def fetch_jwt_bundles(self) -> BundleSet[JwtBundle]:
        return self._first("FetchJWTBundles", pb.JWTBundlesRequest(), decode_jwt_bundles_response)

    def fetch_jwt_svids(self, audiences: str | list[str] | tuple[str, ...], spiffe_id: SpiffeId | str | None = None
                        ) -> list[JwtSvid]:
        auds = _audiences(audiences)
        request = pb.JWTSVIDRequest(audience=list(auds), spiffe_id=str(spiffe_id) if spiffe_id else "")
        return decode_jwt_svid_response(self._unary("FetchJWTSVID", request), auds)

    def fetch_jwt_svid(self, audiences: str | list[str] | tuple[str, ...], spiffe_id: SpiffeId | str | None = None
                       ) -> JwtSvid:
        """A JWT-SVID for ``audiences``: the default identity's, or the one for ``spiffe_id``."""
        return self.fetch_jwt_svids(audiences, spiffe_id)[0]

    def validate_jwt_svid(self, token: str, audience: str) -> JwtSvid:
        """Asks the agent to validate ``token`` for ``audience``; raises a WorkloadApiError if it is refused."""
        if not token or not audience:
            raise WorkloadApiError("validate_jwt_svid needs a token and an audience")
        resp = self._unary("ValidateJWTSVID", pb.ValidateJWTSVIDRequest(audience=audience, svid=token))
        return decode_validate_response(resp, token, audience)

    # -- watches ---------------------------------------------------------------------------------------

    def watch_x509_context(
        self, on_update: Callable[[X509Context], None], on_error: ErrorCallback | None = None
    ) -> Watch:
        """Calls ``on_update`` with every X.509 context the agent pushes (on a background thread) until
        cancelled; transient errors go to ``on_error`` and the watch reconnects."""
        return self._watch("FetchX509SVID", pb.X509SVIDRequest(), decode_x509_svid_response, on_update, on_error)

    def watch_x509_bundles(
        self, on_update: Callable[[BundleSet[X509Bundle]], None], on_error: ErrorCallback | None = None
    ) -> Watch:
        return self._watch(
            "FetchX509Bundles", pb.X509BundlesRequest(), decode_x509_bundles_response, on_update, on_error
        )

    def watch_jwt_bundles(
        self, on_update: Callable[[BundleSet[JwtBundle]], None], on_error: ErrorCallback | None = None
    ) -> Watch:
        return self._watch("FetchJWTBundles", pb.JWTBundlesRequest(), decode_jwt_bundles_response, on_update, on_error)

    def _watch(
        self,
        rpc_name: str,
        request: Any,
        decode: Callable[[Any], T],
        on_update: Callable[[T], None],
        on_error: ErrorCallback | None,
    ) -> Watch:
        with self._lock:
            self._check_open()
            watch = Watch(rpc_name)
            self._watches.add(watch)
        thread = threading.Thread(
            target=self._run_watch,
            args=(watch, rpc_name, request, decode, on_update, on_error),
            name=f"tessera-watch-{rpc_name}",
            daemon=True,
        )
        watch._thread = thread
        thread.start()
        return watch

    def _run_watch(
        self,
        watch: Watch,
        rpc_name: str,
        request: Any,
        decode: Callable[[Any], T],
        on_update: Callable[[T], None],
        on_error: ErrorCallback | None,
    ) -> None:
        backoff = self._backoff.start()
        try:
            while not watch._stop.is_set():
                error = self._stream_once(watch, rpc_name, request, decode, on_update, on_error, backoff.reset)
                if error is None or watch._stop.is_set():
                    break
                if is_final(error):
                    watch.error = error
                    _report(on_error, error, rpc_name)
                    break
                _report(on_error, error, rpc_name)
                watch._stop.wait(backoff.next_delay())
        finally:
            watch._done.set()
            with self._lock:
                self._watches.discard(watch)

    def _stream_once(
        self,
        watch: Watch,
        rpc_name: str,
        request: Any,
        decode: Callable[[Any], T],
        on_update: Callable[[T], None],
        on_error: ErrorCallback | None,
        on_message: Callable[[], None],
    ) -> WorkloadApiError | None:
        """Runs one stream to its end; returns why it ended (None when the watch was cancelled)."""
        call = getattr(self._stub, rpc_name)(request, metadata=SECURITY_METADATA)
        if not watch._set_call(call):
            call.cancel()
            return None
        responses: Iterator[Any] = call
        try:
            for resp in responses:
                try:
                    update = decode(resp)
                except WorkloadApiResponseError as exc:
                    _report(on_error, exc, rpc_name)
                    continue
                on_message()
                try:
                    on_update(update)
                except Exception:
                    log.exception("%s: update callback raised", rpc_name)
        except grpc.RpcError as exc:
            if watch._stop.is_set():
                return None
            return error_from_rpc(exc, rpc_name, self.address)
        if watch._stop.is_set():
            return None
        return WorkloadApiStreamEndedError(
            f"Workload API {rpc_name} at {self.address} ended the stream without an error; reconnecting"
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise WorkloadApiClosedError(f"Workload API client for {self.address} is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watches = list(self._watches)
        for watch in watches:
            watch.cancel()
        for watch in watches:
            watch.wait(5.0)
        self._channel.close()

    def __enter__(self) -> WorkloadApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _audiences(audiences: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    auds = (audiences,) if isinstance(audiences, str) else tuple(audiences)
    if not auds or not all(auds):
        raise WorkloadApiError("a JWT-SVID needs at least one non-empty audience")
    return auds


__all__ = ["Watch", "WorkloadApiClient"]
