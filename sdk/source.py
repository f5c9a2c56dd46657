"""Self-refreshing identity sources: the object a workload holds to always have a current SVID and bundles.

A source watches the Workload API in the background and swaps in each update as one immutable snapshot, so a
reader never sees a new SVID with old bundles (or the reverse): TLS contexts and gRPC credentials are built
from a snapshot, never from fields read one by one. Construction blocks until the first update arrives (or
fails with a clear error after ``timeout``) so a workload never starts serving without an identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tessera.sdk.bundle import BundleSet, JwtBundle, X509Bundle
from tessera.sdk.errors import WorkloadApiError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.workloadapi.aio import AsyncWorkloadApiClient
from tessera.sdk.workloadapi.client import Watch, WorkloadApiClient
from tessera.sdk.workloadapi.common import (
    BackoffPolicy,
    WorkloadApiClosedError,
    WorkloadApiTimeoutError,
    X509Context,
    is_final,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SvidPicker = Callable[[Sequence[X509Svid]], X509Svid]


@dataclass(frozen=True, slots=True)
class X509Snapshot:
    """The SVID to present and the bundles to trust, taken from one update. Compare by identity (``is``)
    to know whether anything changed: every update makes a new snapshot."""

    svid: X509Svid
    bundles: BundleSet[X509Bundle]
    svids: tuple[X509Svid, ...] = ()
    crls: tuple[bytes, ...] = ()
    """DER CRLs from the Workload API: TLS contexts built from this snapshot refuse the certificates listed."""

    def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self.bundles.get(trust_domain)


class X509SnapshotSource(Protocol):
    """What TLS contexts and gRPC credentials need: a cheap, non-blocking read of the current snapshot."""

    def snapshot(self) -> X509Snapshot: ...


def _default_picker(svids: Sequence[X509Svid]) -> X509Svid:
    return svids[0]


def pick_by_id(spiffe_id: SpiffeId | str) -> SvidPicker:
    """A picker choosing the SVID with this SPIFFE ID (for workloads entitled to several identities)."""
    wanted = SpiffeId.parse(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id

    def pick(svids: Sequence[X509Svid]) -> X509Svid:
        for svid in svids:
            if svid.spiffe_id == wanted:
                return svid
        raise WorkloadApiError(f"the Workload API offers no SVID for {wanted}; got {[str(s.spiffe_id) for s in svids]}")

    return pick


class _Listeners(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Callable[[T], None]] = []

    def add(self, callback: Callable[[T], None]) -> Callable[[], None]:
        with self._lock:
            self._items.append(callback)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._items.remove(callback)

        return remove

    def fire(self, value: T) -> None:
        with self._lock:
            items = list(self._items)
        for callback in items:
            try:
                callback(value)
            except Exception:
                log.exception("source update listener raised")


class StaticX509Source:
    """A source fed by the program itself (files, a test CA, a benchmark): same interface as X509Source,
    and ``set()`` swaps in a new SVID and/or bundles atomically."""

    def __init__(self, svid: X509Svid, bundles: BundleSet[X509Bundle] | X509Bundle) -> None:
        self._lock = threading.Lock()
        self._snapshot = X509Snapshot(svid, _as_bundle_set(bundles), (svid,))
        self._listeners: _Listeners[X509Snapshot] = _Listeners()

    def snapshot(self) -> X509Snapshot:
        return self._snapshot

    @property
    def svid(self) -> X509Svid:
        return self._snapshot.svid

    @property
    def bundles(self) -> BundleSet[X509Bundle]:
        return self._snapshot.bundles

    def set(self, svid: X509Svid | None = None, bundles: BundleSet[X509Bundle] | X509Bundle | None = None) -> None:
        with self._lock:
            old = self._snapshot
            new_svid = svid or old.svid
            snap = X509Snapshot(new_svid, _as_bundle_set(bundles) if bundles is not None else old.bundles, (new_svid,))
            self._snapshot = snap
        self._listeners.fire(snap)

    def add_listener(self, callback: Callable[[X509Snapshot], None]) -> Callable[[], None]:
        return self._listeners.add(callback)


def _as_bundle_set(bundles: BundleSet[X509Bundle] | X509Bundle) -> BundleSet[X509Bundle]:
    return BundleSet([bundles]) if isinstance(bundles, X509Bundle) else bundles


class _SyncWatchedSource(Generic[T]):
    """Runs one client watch, keeps the latest value and wakes up the constructor on the first one."""

    _kind = "update"

    def __init__(
        self,
        client: WorkloadApiClient | None,
        address: str | None,
        timeout: float | None,
        backoff: BackoffPolicy | None,
    ) -> None:
        self._owns_client = client is None
        self._client = client or WorkloadApiClient(address, backoff=backoff)
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._value: T | None = None
        self._last_error: WorkloadApiError | None = None
        self._closed = False
        self._listeners: _Listeners[T] = _Listeners()
        self._watch: Watch | None = None
        self._timeout = timeout

    def _start(self) -> None:
        self._watch = self._begin_watch()
        deadline_ok = self._wait_first(self._timeout)
        if deadline_ok:
            return
        error = self._watch.error
        self.close()
        if error is not None:
            raise error
        last = f"; last error: {self._last_error}" if self._last_error else ""
        raise WorkloadApiTimeoutError(
            f"no {self._kind} from the Workload API at {self._client.address} within {self._timeout}s{last}"
        )

    def _wait_first(self, timeout: float | None) -> bool:
        assert self._watch is not None
        watch = self._watch
        # Wake up early when the watch stops for good (InvalidArgument) instead of sleeping to the deadline.
        step = 0.05
        waited = 0.0
        while timeout is None or waited < timeout:
            if self._first.wait(step):
                return True
            if watch.stopped:
                return self._first.is_set()
            waited += step
        return self._first.is_set()

    def _begin_watch(self) -> Watch:
        raise NotImplementedError

    def _convert(self, update: object) -> T:
        raise NotImplementedError

    def _on_update(self, update: object) -> None:
        try:
            value = self._convert(update)
        except WorkloadApiError as exc:  # e.g. the picker found no SVID for its SPIFFE ID
            self._on_error(exc)
            return
        with self._lock:
            if self._closed:
                return
            self._value = value
            self._last_error = None
        self._first.set()
        self._listeners.fire(value)

    def _on_error(self, error: WorkloadApiError) -> None:
        self._last_error = error
        if is_final(error):
            log.error("Workload API watch stopped for good: %s", error)
        else:
            log.warning("Workload API watch: %s (retrying)", error)

    def _current(self) -> T:
        value = self._value
        if value is None or self._closed:
            raise WorkloadApiClosedError("source is closed" if self._closed else "source has no update yet")
        return value

    def add_listener(self, callback: Callable[[T], None]) -> Callable[[], None]:
        """Calls ``callback`` with every new snapshot (on the watch thread); returns a function that removes it."""
        return self._listeners.add(callback)

    @property
    def error(self) -> WorkloadApiError | None:
        """The error that stopped the watch for good (InvalidArgument), if it has."""
        return self._watch.error if self._watch else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch.wait(5.0)
        if self._owns_client:
            self._client.close()

    @property
    def closed(self) -> bool:
        return self._closed


class X509Source(_SyncWatchedSource[X509Snapshot]):
    """Keeps this workload's X509-SVID and X.509 bundles current from the Workload API.

    ``X509Source()`` blocks until the first update (``timeout`` seconds, then WorkloadApiTimeoutError naming
    the last error). ``picker`` chooses among several SVIDs (default: the first, the agent's default).
    """

    _kind = "X.509 context"

    def __init__(
        self,
        client: WorkloadApiClient | None = None,
        *,
        address: str | None = None,
        timeout: float | None = 10.0,
        picker: SvidPicker | None = None,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        super().__init__(client, address, timeout, backoff)
        self._picker = picker or _default_picker
        self._start()

    def _begin_watch(self) -> Watch:
        return self._client.watch_x509_context(self._on_update, self._on_error)

    def _convert(self, update: object) -> X509Snapshot:
        assert isinstance(update, X509Context)
        return X509Snapshot(self._picker(update.svids), update.bundles, update.svids, update.crls)

    def snapshot(self) -> X509Snapshot:
        return self._current()

    @property
    def svid(self) -> X509Svid:
        return self._current().svid

    @property
    def bundles(self) -> BundleSet[X509Bundle]:
        return self._current().bundles

    def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self._current().bundle_for(trust_domain)

    def __enter__(self) -> X509Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JwtSource(_SyncWatchedSource[BundleSet[JwtBundle]]):
    """Keeps the JWT bundles current (to validate tokens locally) and fetches JWT-SVIDs on demand."""

    _kind = "JWT bundle"

    def __init__(
        self,
        client: WorkloadApiClient | None = None,
        *,
        address: str | None = None,
        timeout: float | None = 10.0,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        super().__init__(client, address, timeout, backoff)
        self._start()

    def _begin_watch(self) -> Watch:
        return self._client.watch_jwt_bundles(self._on_update, self._on_error)

    def _convert(self, update: object) -> BundleSet[JwtBundle]:
        assert isinstance(update, BundleSet)
        return update

    @property
    def bundles(self) -> BundleSet[JwtBundle]:
        return self._current()

    def fetch_jwt_svid(self, audiences: str | Sequence[str], spiffe_id: SpiffeId | str | None = None) -> JwtSvid:
        self._current()
        return self._client.fetch_jwt_svid(_auds(audiences), spiffe_id)

    def validate(self, token: str, audience: str) -> JwtSvid:
        """Validates ``token`` locally against the current JWT bundles (signature, expiry, audience)."""
        return JwtSvid.parse_and_validate(token, self._current(), audience)

    def __enter__(self) -> JwtSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _auds(audiences: str | Sequence[str]) -> tuple[str, ...]:
    return (audiences,) if isinstance(audiences, str) else tuple(audiences)


# -- asyncio twins ------------------------------------------------------------------------------------------


class _AsyncWatchedSource(Generic[T]):
    _kind = "update"

    def __init__(
        self,
        client: AsyncWorkloadApiClient | None,
        address: str | None,
        timeout: float | None,
        backoff: BackoffPolicy | None,
    ) -> None:
        self._client_arg = client
        self._address = address
        self._backoff = backoff
        self._timeout = timeout
        self._client: AsyncWorkloadApiClient | None = client
        self._value: T | None = None
        self._first: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_error: WorkloadApiError | None = None
        self._final_error: WorkloadApiError | None = None
        self._closed = False
        self._listeners: _Listeners[T] = _Listeners()

    def _watch(self, client: AsyncWorkloadApiClient) -> object:
        raise NotImplementedError

    def _convert(self, update: object) -> T:
        raise NotImplementedError

    async def start(self) -> None:
        """Starts watching; returns after the first update, or raises (WorkloadApiTimeoutError after
        ``timeout`` seconds, or the error that stopped the watch for good)."""
        if self._client is None:
            self._client = AsyncWorkloadApiClient(self._address, backoff=self._backoff)
        self._first = asyncio.Event()
        self._task = asyncio.create_task(self._run(self._client))
        waiter = asyncio.create_task(self._first.wait())
        try:
            await asyncio.wait({waiter, self._task}, timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._first.is_set():
            return
        error = self._final_error
        address = self._client.address
        await self.close()
        if error is not None:
            raise error
        last = f"; last error: {self._last_error}" if self._last_error else ""
        raise WorkloadApiTimeoutError(
            f"no {self._kind} from the Workload API at {address} within {self._timeout}s{last}"
        )

    def _on_error(self, error: WorkloadApiError) -> None:
        self._last_error = error

    async def _run(self, client: AsyncWorkloadApiClient) -> None:
        try:
            async for update in self._watch(client):  # type: ignore[attr-defined]
                try:
                    value = self._convert(update)
                except WorkloadApiError as exc:  # e.g. the picker found no SVID for its SPIFFE ID
                    self._on_error(exc)
                    continue
                self._value = value
                self._last_error = None
                assert self._first is not None
                self._first.set()
                self._listeners.fire(value)
        except WorkloadApiError as exc:
            self._final_error = exc
            log.error("Workload API watch stopped for good: %s", exc)

    def _current(self) -> T:
        value = self._value
        if value is None or self._closed:
            raise WorkloadApiClosedError("source is closed" if self._closed else "source has not started")
        return value

    def add_listener(self, callback: Callable[[T], None]) -> Callable[[], None]:
        return self._listeners.add(callback)

    @property
    def error(self) -> WorkloadApiError | None:
        return self._final_error

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._client_arg is None and self._client is not None:
            await self._client.close()
            self._client = None


class AsyncX509Source(_AsyncWatchedSource[X509Snapshot]):
    """asyncio twin of :class:`X509Source`: ``async with AsyncX509Source(...) as source`` (or ``await
    source.start()``); ``snapshot()`` stays a cheap synchronous read so TLS contexts can use it."""

    _kind = "X.509 context"

    def __init__(
        self,
        client: AsyncWorkloadApiClient | None = None,
        *,
        address: str | None = None,
        timeout: float | None = 10.0,
        picker: SvidPicker | None = None,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        super().__init__(client, address, timeout, backoff)
        self._picker = picker or _default_picker

    def _watch(self, client: AsyncWorkloadApiClient) -> object:
        return client.watch_x509_context(self._on_error)

    def _convert(self, update: object) -> X509Snapshot:
        assert isinstance(update, X509Context)
        return X509Snapshot(self._picker(update.svids), update.bundles, update.svids, update.crls)

    def snapshot(self) -> X509Snapshot:
        return self._current()

    @property
    def svid(self) -> X509Svid:
        return self._current().svid

    @property
    def bundles(self) -> BundleSet[X509Bundle]:
        return self._current().bundles

    async def __aenter__(self) -> AsyncX509Source:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncJwtSource(_AsyncWatchedSource[BundleSet[JwtBundle]]):
    """asyncio twin of :class:`JwtSource`."""

    _kind = "JWT bundle"

    def __init__(
        self,
        client: AsyncWorkloadApiClient | None = None,
        *,
        address: str | None = None,
        timeout: float | None = 10.0,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        super().__init__(client, address, timeout, backoff)

    def _watch(self, client: AsyncWorkloadApiClient) -> object:
        return client.watch_jwt_bundles(self._on_error)

    def _convert(self, update: object) -> BundleSet[JwtBundle]:
        assert isinstance(update, BundleSet)
        return update

    @property
    def bundles(self) -> BundleSet[JwtBundle]:
        return self._current()

    async def fetch_jwt_svid(self, audiences: str | Sequence[str], spiffe_id: SpiffeId | str | None = None) -> JwtSvid:
        self._current()
        assert self._client is not None
        return await self._client.fetch_jwt_svid(_auds(audiences), spiffe_id)

    def validate(self, token: str, audience: str) -> JwtSvid:
        return JwtSvid.parse_and_validate(token, self._current(), audience)

    async def __aenter__(self) -> AsyncJwtSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
