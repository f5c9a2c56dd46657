"""Servicers raise; a status table answers: one ordered table from error class to gRPC status per daemon.

- A servicer that aborts by hand at each refusal mixes what went wrong with how the wire says it, and the codes
  drift between methods, while clients act on them (SPIFFE.md: INVALID_ARGUMENT makes a standard source give up
  for good, PERMISSION_DENIED and UNAVAILABLE make it retry). One ordered table keeps every method's answers
  the same: the first row whose class matches decides.
- An error raised on purpose becomes its row's status with its own message (written to be actionable and free
  of secrets, optionally after the row's prefix); anything else is a bug: logged with its traceback and answered
  INTERNAL with no detail. Either way the daemon keeps serving. Callers can repeat a refusal at will, so the log
  lines are rate-limited.
- Unary and server-streaming methods alike: a stream can be refused after it has sent messages (its caller's
  identity went away), and its generator is closed whichever way it ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from tessera._daemon.ratelog import RateLimitedLog

S = TypeVar("S")
Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Rule:
    """Errors of class ``error`` are answered ``code``; ``prefix`` goes before the message when the error itself
    does not say what failed (e.g. "workload attestation failed: " before "process 42 has exited")."""

    error: type[BaseException]
    code: grpc.StatusCode
    prefix: str = ""


class StatusTable:
    """The ordered rules of one daemon, and the decorators that apply them to servicer methods
    ``(self, request, context)``."""

    def __init__(self, rules: Sequence[Rule], log: logging.Logger, *, internal_message: str) -> None:
        self.rules = tuple(rules)
        self.internal_message = internal_message
        self._log = RateLimitedLog(log)

    def status_for(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        for rule in self.rules:
            if isinstance(exc, rule.error):
                return rule.code, f"{rule.prefix}{exc}"
        return grpc.StatusCode.INTERNAL, self.internal_message

    async def abort(self, context: Any, exc: BaseException, method: str) -> NoReturn:
        """Ends the call with the status ``exc`` deserves (``context.abort`` raises)."""
        code, message = self.status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            self._log.log(logging.ERROR, "unexpected error in %s", method, exc_info=exc, key=("internal", method))
        else:
            self._log.log(logging.DEBUG, "%s refused: %s: %s", method, code.name, message, key=(method, code))
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    def unary(self, method: Callable[[S, Q, Any], Awaitable[R]]) -> Callable[[S, Q, Any], Awaitable[R]]:
        @functools.wraps(method)
        async def answered(servicer: S, request: Q, context: Any) -> R:
            try:
                return await method(servicer, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self.abort(context, exc, method.__name__)

        return answered

    def stream(
        self, method: Callable[[S, Q, Any], AsyncGenerator[R, None]]
    ) -> Callable[[S, Q, Any], AsyncGenerator[R, None]]:
        @functools.wraps(method)
        async def answered(servicer: S, request: Q, context: Any) -> AsyncGenerator[R, None]:
            try:
                async with contextlib.aclosing(method(servicer, request, context)) as messages:
                    async for message in messages:
                        yield message
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self.abort(context, exc, method.__name__)

        return answered


__all__ = ["Rule", "StatusTable"]
