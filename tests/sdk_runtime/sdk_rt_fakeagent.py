"""A test double of the agent's Workload API for SDK tests: a real gRPC server on a temp Unix socket serving
TestCA-issued SVIDs, with knobs to push rotations, refuse callers, and end streams the wrong way."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from support import procs

from tessera.proto import workload_pb2 as pb
from tessera.sdk.bundle import JwtBundle, X509Bundle
from tessera.sdk.svid import X509Svid
from tessera.sdk.workloadapi.wire import SECURITY_HEADER_KEY, generic_handler


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> Any:
    """The shared wait, polling faster: everything here is in-process and quick."""
    return procs.wait_for(predicate, timeout, what, interval=0.02)


@dataclass
class State:
    svids: list[X509Svid] = field(default_factory=list)
    bundles: list[X509Bundle] = field(default_factory=list)  # the first is the SVIDs' own trust domain's
    jwt_bundles: list[JwtBundle] = field(default_factory=list)
    jwt_mint: Callable[[str, Sequence[str]], str] | None = None  # (spiffe_id, audiences) -> token
    jwt_validate: Callable[[str, str], tuple[str, dict[str, Any]]] | None = None
    refuse: grpc.StatusCode | None = None  # every call fails with this status
    version: int = 0


class FakeAgent:
    def __init__(self, socket_dir: str | None = None) -> None:
        self.dir = socket_dir or tempfile.mkdtemp(dir="/tmp", prefix="trt-")
        self.socket_path = os.path.join(self.dir, "api.sock")
        self.address = "unix://" + self.socket_path
        self.state = State()
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self._end_ok = 0  # generation: streams end with OK when it changes
        self.calls: dict[str, int] = {}

    # -- control ---------------------------------------------------------------------------------------
    def set_x509(self, svids: Sequence[X509Svid], bundles: Sequence[X509Bundle]) -> None:
        with self._cond:
            self.state.svids = list(svids)
            self.state.bundles = list(bundles)
            self.state.version += 1
            self._cond.notify_all()

    def set_jwt(self, bundles: Sequence[JwtBundle], mint: Any = None, validate: Any = None) -> None:
        with self._cond:
            self.state.jwt_bundles = list(bundles)
            if mint is not None:
                self.state.jwt_mint = mint
            if validate is not None:
                self.state.jwt_validate = validate
            self.state.version += 1
            self._cond.notify_all()

    def refuse(self, code: grpc.StatusCode | None) -> None:
        with self._cond:
            self.state.refuse = code
            self.state.version += 1
            self._cond.notify_all()

    def end_streams_ok(self) -> None:
        with self._cond:
            self._end_ok += 1
            self._cond.notify_all()

    def start(self) -> FakeAgent:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        server.add_generic_rpc_handlers((generic_handler(self),))
        server.add_insecure_port("unix:" + self.socket_path)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            with self._cond:
                self._cond.notify_all()
            self._server.stop(0).wait(10)
            self._server = None

    def _count(self, name: str) -> None:
        with self._cond:
            self.calls[name] = self.calls.get(name, 0) + 1

    # -- servicer ----------------------------------------------------------------------------------------
    def _check(self, context: grpc.ServicerContext) -> None:
        md = [v for k, v in context.invocation_metadata() if k == SECURITY_HEADER_KEY]
        if md != ["true"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        if self.state.refuse is not None:
            context.abort(self.state.refuse, f"refused by test ({self.state.refuse.name})")

    def _stream(self, context: grpc.ServicerContext, build: Callable[[], Any]) -> Iterator[Any]:
        seen = -1
        end_gen = self._end_ok
        while context.is_active():
            with self._cond:
                while self.state.version == seen and self._end_ok == end_gen and context.is_active():
                    if self._server is None:
                        break
                    self._cond.wait(0.2)
                if self._end_ok != end_gen:
                    return  # ends with OK: a misbehaving agent
                if self._server is None:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
                seen = self.state.version
                self._check(context)
                msg = build()
            if msg is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            yield msg

    def _x509_response(self) -> pb.X509SVIDResponse | None:
        if not self.state.svids:
            return None
        own = self.state.bundles[0]
        resp = pb.X509SVIDResponse()
        for svid in self.state.svids:
            resp.svids.add(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=svid.chain_der(),
                x509_svid_key=svid.key_der(),
                bundle=own.der(),
                hint=svid.hint,
            )
        for bundle in self.state.bundles[1:]:
            resp.federated_bundles[bundle.trust_domain.id_string] = bundle.der()
        return resp

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._count("FetchX509SVID")
        self._check(context)
        yield from self._stream(context, self._x509_response)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._count("FetchX509Bundles")
        self._check(context)

        def build() -> Any:
            if not self.state.bundles:
                return None
            return pb.X509BundlesResponse(bundles={b.trust_domain.id_string: b.der() for b in self.state.bundles})

        yield from self._stream(context, build)

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._count("FetchJWTBundles")
        self._check(context)

        def build() -> Any:
            if not self.state.jwt_bundles:
                return None
            jwks = {b.trust_domain.id_string: b.to_jwks() for b in self.state.jwt_bundles}
            return pb.JWTBundlesResponse(bundles=jwks)

        yield from self._stream(context, build)

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._count("FetchJWTSVID")
        self._check(context)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        mint = self.state.jwt_mint
        if mint is None or not self.state.svids:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            raise AssertionError("unreachable")
        resp = pb.JWTSVIDResponse()
        for svid in self.state.svids:
            if request.spiffe_id and request.spiffe_id != str(svid.spiffe_id):
                continue
            token = mint(str(svid.spiffe_id), list(request.audience))
            resp.svids.add(spiffe_id=str(svid.spiffe_id), svid=token, hint=svid.hint)
        if not resp.svids:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity for that SPIFFE ID")
        return resp

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._count("ValidateJWTSVID")
        self._check(context)
        validate = self.state.jwt_validate
        if validate is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no validator")
            raise AssertionError("unreachable")
        try:
            sid, claims = validate(request.svid, request.audience)
        except Exception as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token invalid: {exc}")
        resp = pb.ValidateJWTSVIDResponse(spiffe_id=sid)
        resp.claims.update(claims)
        return resp
