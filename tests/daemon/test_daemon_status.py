"""The status table both daemons' servicers answer through (tessera._daemon.status), over real gRPC: the first
matching rule decides the code, the message is the error's own (after the rule's prefix), anything unexpected is
INTERNAL with no detail and one logged traceback, and a stream's generator is closed however the call ends."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from tessera._daemon.status import Rule, StatusTable


class Base(Exception):
    pass


class Specific(Base):
    pass


class Prefixed(Exception):
    pass


TABLE = StatusTable(
    (
        Rule(Specific, grpc.StatusCode.PERMISSION_DENIED),
        Rule(Base, grpc.StatusCode.INVALID_ARGUMENT),
        Rule(Prefixed, grpc.StatusCode.UNAVAILABLE, "it failed: "),
    ),
    logging.getLogger("tessera.test.status"),
    internal_message="internal error (see the log)",
)

RAISED: dict[bytes, Exception] = {
    b"specific": Specific("only this one"),
    b"base": Base("the caller's mistake"),
    b"prefixed": Prefixed("disk on fire"),
    b"bug": KeyError("secret-key-material"),
}


class Servicer:
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    @TABLE.unary
    async def unary(self, request: bytes, context: Any) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "aborted by the servicer itself")
        if request in RAISED:
            raise RAISED[request]
        return b"ok:" + request

    @TABLE.stream
    async def stream(self, request: bytes, context: Any) -> AsyncGenerator[bytes, None]:
        try:
            yield b"first"
            if request in RAISED:
                raise RAISED[request]
            await asyncio.Event().wait()  # until the caller goes away
        finally:
            self.closed.set()


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[Servicer, grpc.aio.Channel]]:
    servicer = Servicer()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "U": grpc.unary_unary_rpc_method_handler(servicer.unary),
                    "S": grpc.unary_stream_rpc_method_handler(servicer.stream),
                },
            ),
        )
    )
    with tempfile.TemporaryDirectory(prefix="tst-") as d:
        server.add_insecure_port(f"unix:{d}/s.sock")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{d}/s.sock") as channel:
                yield servicer, channel
        finally:
            await server.stop(None)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def answer(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (b"specific", grpc.StatusCode.PERMISSION_DENIED, "only this one"),  # first matching rule, not its base's
        (b"base", grpc.StatusCode.INVALID_ARGUMENT, "the caller's mistake"),
        (b"prefixed", grpc.StatusCode.UNAVAILABLE, "it failed: disk on fire"),
        (b"bug", grpc.StatusCode.INTERNAL, "internal error (see the log)"),
        (b"abort", grpc.StatusCode.ALREADY_EXISTS, "aborted by the servicer itself"),
    ],
)
def test_unary_answers(request_: bytes, code: grpc.StatusCode, message: str) -> None:
    async def main() -> tuple[grpc.StatusCode, str]:
        async with serving() as (_, channel):
            assert await channel.unary_unary("/t.T/U")(b"fine") == b"ok:fine"
            return await answer(channel.unary_unary("/t.T/U")(request_))

    assert run(main()) == (code, message)


def test_a_bug_is_internal_without_detail_and_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[grpc.StatusCode, str]:
        async with serving() as (_, channel):
            return await answer(channel.unary_unary("/t.T/U")(b"bug"))

    with caplog.at_level(logging.ERROR, "tessera.test.status"):
        code, details = run(main())
    assert code == grpc.StatusCode.INTERNAL and "secret-key-material" not in details
    [record] = [r for r in caplog.records if r.name == "tessera.test.status"]
    assert record.getMessage() == "unexpected error in unary" and record.exc_info is not None


@pytest.mark.parametrize(
    ("request_", "code"),
    [(b"specific", grpc.StatusCode.PERMISSION_DENIED), (b"bug", grpc.StatusCode.INTERNAL)],
)
def test_a_stream_refused_after_a_message_is_answered_and_closed(request_: bytes, code: grpc.StatusCode) -> None:
    async def main() -> None:
        async with serving() as (servicer, channel):
            call = channel.unary_stream("/t.T/S")(request_)
            stream = call.__aiter__()
            assert await stream.__anext__() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream.__anext__()
            assert refused.value.code() == code
            await asyncio.wait_for(servicer.closed.wait(), 10)

    run(main())


def test_a_stream_the_caller_cancels_is_closed() -> None:
    async def main() -> None:
        async with serving() as (servicer, channel):
            call = channel.unary_stream("/t.T/S")(b"wait")
            assert await call.__aiter__().__anext__() == b"first"
            call.cancel()
            await asyncio.wait_for(servicer.closed.wait(), 10)

    run(main())
