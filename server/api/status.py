"""One mapping from the server's errors to gRPC status codes, applied to every servicer method.

Servicers raise; this decorator answers. An error the server raised on purpose becomes its status code with
its own (actionable, secret-free) message; anything else is a bug: it is logged with its traceback and the
caller gets INTERNAL with no detail. Either way the daemon keeps serving.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tessera.sdk.errors import BundleError, SpiffeIdError, SvidError
from tessera.server import errors as se

log = logging.getLogger("tessera.server.api")

R = TypeVar("R")


class ApiError(se.ServerError):
    """An answer with a specific status code, raised inside servicer methods (the one server error that names
    its status itself, so it lives here beside the table rather than in :mod:`tessera.server.errors`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def denied(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, message)


def not_found(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, message)


# Most specific first: the first matching class decides.
_MAPPING: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (se.AgentBannedError, grpc.StatusCode.PERMISSION_DENIED),
    (se.JoinTokenExpiredError, grpc.StatusCode.PERMISSION_DENIED),
    (se.InvalidPageTokenError, grpc.StatusCode.INVALID_ARGUMENT),
    (se.NotFound, grpc.StatusCode.NOT_FOUND),
    (se.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (se.RevisionConflictError, grpc.StatusCode.ABORTED),
    (se.DatastoreError, grpc.StatusCode.UNAVAILABLE),
    (se.CaNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (se.UnknownAuthorityError, grpc.StatusCode.NOT_FOUND),
    (se.BadCsrError, grpc.StatusCode.INVALID_ARGUMENT),
    (se.BadSigningRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (se.CaError, grpc.StatusCode.FAILED_PRECONDITION),
    (se.SelectorError, grpc.StatusCode.INVALID_ARGUMENT),
    (se.EntryValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (SpiffeIdError, grpc.StatusCode.INVALID_ARGUMENT),
    (BundleError, grpc.StatusCode.INVALID_ARGUMENT),
    (SvidError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    for cls, code in _MAPPING:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error (see the server log)"


def handle_errors(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Wraps an async servicer method ``(self, request, context)`` so every failure becomes a status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected error in %s", method.__name__)
            else:
                log.info("%s refused: %s: %s", method.__name__, code.name, message)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper
