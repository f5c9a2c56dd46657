"""gRPC over SPIFFE mutual TLS: rotating server credentials, interceptors that authorize the caller's SPIFFE ID,
and client channels that follow rotation.

* Server: :func:`server_credentials` wraps ``grpc.dynamic_ssl_server_credentials``. gRPC calls its fetcher on
  every new connection on its own threads, so it only compares the source's snapshot by identity and hands
  back a prepared configuration when (and only when) it changed.
* Authorization: gRPC's TLS stack verifies the client chain against the bundles but knows nothing of SPIFFE
  IDs, so :class:`SpiffeServerInterceptor` (sync) and :class:`AsyncSpiffeServerInterceptor` (``grpc.aio``)
  hand the caller's chain to the same peer verifier as the ``ssl`` contexts (:mod:`tessera.sdk.peer`) before
  the handler runs and fail the call with PERMISSION_DENIED otherwise. Handlers
  read the caller with :func:`peer_spiffe_id` (from the context) or :func:`current_peer_id` (a contextvar).
* Client: a Python gRPC client cannot verify a server by URI SAN: hostname checking always runs. Servers
  that gRPC clients reach therefore carry a DNS SAN (registration entry ``dns_names``), and the client
  names it with ``grpc.ssl_target_name_override`` while verifying the chain against the SPIFFE bundles.
  :class:`SpiffeChannel` makes a new underlying channel (new credentials) when the SVID or bundles change;
  calls already running keep their old channel, which is closed after ``retire_after`` seconds.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tessera.sdk.errors import AuthorizationError
from tessera.sdk.peer import CACHE_SIZE, Authorizer, PeerAuthorizationError, PeerVerifier
from tessera.sdk.source import X509Snapshot, X509SnapshotSource
from tessera.sdk.spiffeid import SpiffeId

log = logging.getLogger(__name__)

_PEER: contextvars.ContextVar[SpiffeId | None] = contextvars.ContextVar("tessera_grpc_peer", default=None)


def _bundle_pem(snapshot: X509Snapshot) -> bytes:
    return b"".join(bundle.pem() for bundle in snapshot.bundles.values())


# -- server credentials ----------------------------------------------------------------------------------


def server_credentials(source: X509SnapshotSource) -> grpc.ServerCredentials:
    """TLS server credentials presenting the source's current SVID and requiring client certificates that
    chain to its current bundles; both follow rotation for new connections without a restart."""
    lock = threading.Lock()
    first = source.snapshot()
    last: list[X509Snapshot] = [first]

    def config(snapshot: X509Snapshot) -> Any:
        svid = snapshot.svid
        return grpc.ssl_server_certificate_configuration(
            [(svid.key_pem(), svid.chain_pem())], root_certificates=_bundle_pem(snapshot)
        )

    def fetch() -> Any:
        snapshot = source.snapshot()
        if snapshot is last[0]:
            return None
        with lock:
            if snapshot is last[0]:
                return None
            last[0] = snapshot
        log.debug("gRPC server credentials rotated to %s", snapshot.svid.spiffe_id)
        return config(snapshot)

    return grpc.dynamic_ssl_server_credentials(config(first), fetch, require_client_authentication=True)


# -- peer identity ---------------------------------------------------------------------------------------


class _Verifiers:
    """The peer verifier (:mod:`tessera.sdk.peer`) of the source's current snapshot: a new one per snapshot,
    so its cache of verified chains follows the bundles and CRLs. Without a source the bundles are unknown:
    gRPC's TLS verified the chain against its trust store, and the verifier checks the leaf rules and dates."""

    def __init__(self, source: X509SnapshotSource | None) -> None:
        self._source = source
        self._current: tuple[X509Snapshot | None, PeerVerifier] = (None, PeerVerifier(None))

    def current(self) -> PeerVerifier:
        if self._source is None:
            return self._current[1]
        snapshot = self._source.snapshot()
        current = self._current
        if current[0] is not snapshot:
            current = (snapshot, PeerVerifier(snapshot.bundles, snapshot.crls))
            self._current = current
        return current[1]


_LEAF_RULES = _Verifiers(None)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _der_chain(leaf_pem: bytes, chain_pem: bytes | None) -> tuple[bytes, ...]:
    """The caller's chain as DER, leaf first; the same callers' chains come back on every call.

    gRPC reports the leaf (``x509_pem_cert``) apart from the rest: on the server side its
    ``x509_pem_cert_chain`` holds only the intermediates (OpenSSL's peer chain leaves the leaf out there).
    """
    leaf = x509.load_pem_x509_certificate(leaf_pem).public_bytes(Encoding.DER)
    rest = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(chain_pem)] if chain_pem else []
    return (leaf, *(der for der in rest if der != leaf))


def _auth_value(auth: Any, key: str) -> bytes | None:
    values = auth.get(key)
    return values[0] if values else None


def _presented_chain(context: Any) -> tuple[bytes, ...]:
    auth = context.auth_context()
    leaf = _auth_value(auth, "x509_pem_cert")
    if leaf is None:
        raise PeerAuthorizationError("peer presented no certificate (is the server using TLS credentials?)")
    try:
        return _der_chain(leaf, _auth_value(auth, "x509_pem_cert_chain"))
    except ValueError as exc:
        raise PeerAuthorizationError(f"peer certificate chain is unreadable: {exc}") from None


def peer_spiffe_id(context: Any) -> SpiffeId | None:
    """The caller's SPIFFE ID from a servicer context (sync or aio), or None without a valid client SVID
    (its leaf must follow the X509-SVID rules and be within its dates; authorization is the interceptor's)."""
    try:
        return _LEAF_RULES.current().authenticate(_presented_chain(context))
    except PeerAuthorizationError:
        return None


def current_peer_id() -> SpiffeId | None:
    """The caller authorized by the interceptor for the call being handled (a contextvar)."""
    return _PEER.get()


# -- interceptors ----------------------------------------------------------------------------------------


def rewrap_handler(
    handler: Any,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream: Callable[[Callable[..., Any]], Callable[..., Any]],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """A copy of a gRPC method handler (sync or aio) with its behaviour wrapped: ``unary`` wraps behaviours that
    return one response (unary-unary, stream-unary), ``stream`` those that yield responses (unary-stream,
    stream-stream). Interceptors that time, count, limit or authorize calls share this instead of each
    re-implementing grpc's four handler constructors. ``request_deserializer`` replaces the handler's (e.g. one
    that checks a request's size before parsing it)."""
    return _rebuild(
        handler,
        request_deserializer or handler.request_deserializer,
        unary_unary=handler.unary_unary and unary(handler.unary_unary),
        stream_unary=handler.stream_unary and unary(handler.stream_unary),
        unary_stream=handler.unary_stream and stream(handler.unary_stream),
        stream_stream=handler.stream_stream and stream(handler.stream_stream),
    )


def _rebuild(handler: Any, request_deserializer: Callable[[bytes], Any] | None, **behaviours: Any) -> Any:
    if handler.unary_unary is not None:
        make, behaviour = grpc.unary_unary_rpc_method_handler, behaviours["unary_unary"]
    elif handler.unary_stream is not None:
        make, behaviour = grpc.unary_stream_rpc_method_handler, behaviours["unary_stream"]
    elif handler.stream_unary is not None:
        make, behaviour = grpc.stream_unary_rpc_method_handler, behaviours["stream_unary"]
    else:
        make, behaviour = grpc.stream_stream_rpc_method_handler, behaviours["stream_stream"]
    return make(
        behaviour,
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )


class SpiffeServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Rejects callers the peer verifier refuses, with PERMISSION_DENIED, before the handler runs: the same
    verification as the ``ssl`` contexts (:mod:`tessera.sdk.peer`), then ``authorizer``.

    Give ``source`` (the one given to :func:`server_credentials`): the caller's chain is then verified again
    against its own trust domain's bundle and checked against the source's CRLs. Without it, only the leaf
    rules and dates are checked on top of gRPC's own chain verification against every trusted bundle."""

    def __init__(self, authorizer: Authorizer, source: X509SnapshotSource | None = None) -> None:
        self._authorizer = authorizer
        self._verifiers = _Verifiers(source)

    def _check(self, context: Any) -> SpiffeId:
        try:
            return self._verifiers.current().verify(_presented_chain(context), self._authorizer)
        except AuthorizationError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"caller not authorized: {exc}")
            raise  # abort raises; this keeps type checkers honest

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        check = self._check

        def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: Any) -> Any:
                token = _PEER.set(check(context))
                try:
                    return behaviour(request, context)
                finally:
                    _PEER.reset(token)

            return run

        return rewrap_handler(handler, unary, lambda behaviour: _with_peer_stream(check, behaviour))


def _with_peer_stream(check: Callable[[Any], SpiffeId], behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """Streaming responses are produced lazily by gRPC iterating the generator on the call's thread; the
    contextvar is set around each step so the handler sees the caller at every point."""

    def run(request: Any, context: Any) -> Any:
        peer = check(context)
        ctx = contextvars.copy_context()
        ctx.run(_PEER.set, peer)
        responses = ctx.run(behaviour, request, context)
        iterator = iter(responses)
        while True:
            try:
                item = ctx.run(next, iterator)
            except StopIteration:
                return
            yield item

    return run


class AsyncSpiffeServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The ``grpc.aio`` twin of :class:`SpiffeServerInterceptor`."""

    def __init__(self, authorizer: Authorizer, source: X509SnapshotSource | None = None) -> None:
        self._authorizer = authorizer
        self._verifiers = _Verifiers(source)

    async def _check(self, context: Any) -> SpiffeId:
        try:
            return self._verifiers.current().verify(_presented_chain(context), self._authorizer)
        except AuthorizationError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"caller not authorized: {exc}")
            raise

    async def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        check = self._check

        def wrap(behaviour: Callable[..., Any] | None) -> Callable[..., Any] | None:
            if behaviour is None:
                return None
            if inspect.isasyncgenfunction(behaviour):

                async def run_gen(request: Any, context: Any) -> Any:
                    _PEER.set(await check(context))  # each aio call runs in its own task context
                    async for item in behaviour(request, context):
                        yield item

                return run_gen

            async def run(request: Any, context: Any) -> Any:
                _PEER.set(await check(context))
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result

            return run

        return _rebuild(
            handler,
            handler.request_deserializer,
            unary_unary=wrap(handler.unary_unary),
            unary_stream=wrap(handler.unary_stream),
            stream_unary=wrap(handler.stream_unary),
            stream_stream=wrap(handler.stream_stream),
        )


# -- client channels -------------------------------------------------------------------------------------


_last_credentials: tuple[X509Snapshot, grpc.ChannelCredentials] | None = None


def channel_credentials(snapshot: X509Snapshot) -> grpc.ChannelCredentials:
    """Credentials presenting the snapshot's SVID and trusting its bundles (fixed: see SpiffeChannel).

    The last one is kept, so channels opened one after another from the same source share one credentials
    object instead of serializing the key and chain each time.
    """
    global _last_credentials
    last = _last_credentials
    if last is not None and last[0] is snapshot:
        return last[1]
    svid = snapshot.svid
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_bundle_pem(snapshot), private_key=svid.key_pem(), certificate_chain=svid.chain_pem()
    )
    _last_credentials = (snapshot, credentials)
    return credentials


class _RotatingMultiCallable:
    """Stands for a multi-callable on whichever underlying channel is current when a call starts, so stubs
    built once keep working across rotations."""

    def __init__(self, owner: _RotatingChannelBase, kind: str, method: str, kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._kwargs = kwargs
        self._cache: tuple[Any, Any] | None = None

    def _current(self) -> Any:
        channel = self._owner._current_channel()
        cache = self._cache
        if cache is None or cache[0] is not channel:
            cache = (channel, getattr(channel, self._kind)(self._method, **self._kwargs))
            self._cache = cache
        return cache[1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # with_call, future
        return getattr(self._current(), name)


class _RotatingChannelBase:
    def __init__(
        self,
        target: str,
        source: X509SnapshotSource,
        server_name: str,
        options: Sequence[tuple[str, Any]],
        retire_after: float,
    ) -> None:
        if not server_name:
            raise ValueError(
                "server_name is required: gRPC checks the server certificate's DNS SAN, so name one the "
                "server's SVID carries (registration entry dns_names)"
            )
        self._target = target
        self._source = source
        self._options = [*options, ("grpc.ssl_target_name_override", server_name)]
        self._retire_after = retire_after
        self._lock = threading.Lock()
        self._snapshot: X509Snapshot | None = None
        self._channel: Any = None
        self._retired: list[tuple[float, Any]] = []
        self._closed = False
        self._current_channel()

    def _make(self, credentials: grpc.ChannelCredentials) -> Any:
        raise NotImplementedError

    def _close_channel(self, channel: Any) -> None:
        raise NotImplementedError

    def _current_channel(self) -> Any:
        snapshot = self._source.snapshot()
        channel = self._channel
        if snapshot is self._snapshot and channel is not None:
            return channel
        with self._lock:
            if self._closed:
                raise ValueError("channel is closed")
            if snapshot is not self._snapshot or self._channel is None:
                if self._channel is not None:
                    self._retired.append((time.monotonic(), self._channel))
                self._channel = self._make(channel_credentials(snapshot))
                self._snapshot = snapshot
                log.debug("gRPC channel to %s now uses %s", self._target, snapshot.svid.spiffe_id)
            self._reap(time.monotonic())
            return self._channel

    def _reap(self, now: float) -> None:
        keep = []
        for since, channel in self._retired:
            if now - since >= self._retire_after:
                self._close_channel(channel)
            else:
                keep.append((since, channel))
        self._retired = keep

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RotatingMultiCallable(self, "unary_unary", method, _kw(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RotatingMultiCallable(self, "unary_stream", method, _kw(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RotatingMultiCallable(self, "stream_unary", method, _kw(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RotatingMultiCallable(self, "stream_stream", method, _kw(args, kwargs))

    def current(self) -> Any:
        """The underlying channel new calls use right now."""
        return self._current_channel()

    def _take_all(self) -> list[Any]:
        """Marks the channel closed and hands over every underlying channel (current and retired) to close."""
        with self._lock:
            self._closed = True
            channels = [c for _, c in self._retired]
            if self._channel is not None:
                channels.append(self._channel)
            self._retired = []
            self._channel = None
        return channels


def _kw(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("request_serializer", "response_deserializer")
    merged = dict(zip(names, args, strict=False))
    merged.update(kwargs)
    return merged


class SpiffeChannel(_RotatingChannelBase):
    """A ``grpc.Channel`` stand-in for SPIFFE mutual TLS that follows rotation: generated stubs take it
    like any channel (``FooStub(SpiffeChannel(...))``); each call uses the credentials current when it starts.

    ``server_name`` is a DNS SAN of the server's SVID (gRPC verifies the server by it, see module doc).
    """

    def __init__(
        self,
        target: str,
        source: X509SnapshotSource,
        *,
        server_name: str,
        options: Sequence[tuple[str, Any]] = (),
        retire_after: float = 300.0,
    ) -> None:
        super().__init__(target, source, server_name, options, retire_after)

    def _make(self, credentials: grpc.ChannelCredentials) -> grpc.Channel:
        return grpc.secure_channel(self._target, credentials, options=self._options)

    def _close_channel(self, channel: Any) -> None:
        channel.close()

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self._current_channel().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._current_channel().unsubscribe(callback)

    def close(self) -> None:
        for channel in self._take_all():
            channel.close()

    def __enter__(self) -> SpiffeChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSpiffeChannel(_RotatingChannelBase):
    """The ``grpc.aio`` twin of :class:`SpiffeChannel` (create and use it inside the event loop)."""

    def __init__(
        self,
        target: str,
        source: X509SnapshotSource,
        *,
        server_name: str,
        options: Sequence[tuple[str, Any]] = (),
        retire_after: float = 300.0,
    ) -> None:
        self._closing: list[Any] = []
        super().__init__(target, source, server_name, options, retire_after)

    def _make(self, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self._target, credentials, options=self._options)

    def _close_channel(self, channel: Any) -> None:
        import asyncio

        self._closing.append(asyncio.ensure_future(channel.close()))

    async def close(self) -> None:
        for channel in self._take_all():
            await channel.close()
        for task in self._closing:
            await task

    async def __aenter__(self) -> AsyncSpiffeChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
