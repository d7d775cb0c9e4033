"""Limits: request body size, concurrency, per-request timeouts, and input checks.

- `BodySizeLimitMiddleware`: 413 when `Content-Length` is over the limit (before reading a
  byte) and when the streamed body grows over it (chunked uploads carry no length).
- `ConcurrencyGateMiddleware`: at most `max_concurrent_requests` work requests (POST, PUT,
  PATCH, DELETE) are admitted at once; the next one gets 429 with `Retry-After` at once
  instead of waiting in an unbounded queue. GETs (health, metrics, info) are never gated so a
  saturated service still answers its probes. A request that runs longer than
  `request_timeout_s` is cancelled and answered 503 with `Retry-After`.
- `check_*` helpers: raise `APIError(400)` with messages that name the field, the sequence
  index and the position, e.g.
  `sequences[3].token_ids[17]: token id 999999 is outside the vocabulary (0..151935)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException

from services.common.errors import APIError, TrackedSend, error_response

WORK_METHODS: frozenset[str] = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# --------------------------------------------------------------------------- body size


class BodyTooLarge(HTTPException):
    """Raised from inside `receive` when the streamed body passes the limit.

    An HTTPException so FastAPI's body reader re-raises it as is (it turns other exceptions
    into a generic 400) and the error handlers answer 413 with OpenAI's body.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than this server's limit of {limit} "
                              "bytes (max_body_bytes)")


class BodySizeLimitMiddleware:
    """ASGI middleware: refuse bodies over `max_bytes` with 413.

    `overrides` maps a path prefix to its own limit (None: unlimited), for routes such as a
    weights upload whose bodies are legitimately large; the longest matching prefix wins.
    """

    def __init__(
        self,
        app: Any,
        max_bytes: int,
        overrides: Mapping[str, int | None] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = sorted((overrides or {}).items(), key=lambda kv: -len(kv[0]))
        self.on_reject = on_reject

    def limit_for(self, path: str) -> int | None:
        """The byte limit that applies to `path`."""
        for prefix, limit in self.overrides:
            if path.startswith(prefix):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        if limit is None:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    if self.on_reject is not None:
                        self.on_reject()
                    # Close the connection: the client may still be sending the big body.
                    response = error_response(413, BodyTooLarge(limit).detail,
                                              param=None, code="request_too_large",
                                              headers={"Connection": "close"})
                    await response(scope, receive, send)
                    return
                break

        received = 0

        async def counting_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if self.on_reject is not None:
                        self.on_reject()
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


# --------------------------------------------------------------------------- concurrency


class ConcurrencyGate:
    """Counts admitted work requests; `try_enter` refuses beyond `limit` (no waiting).

    One event loop serves the app, so a plain integer is race-free between awaits.
    """

    def __init__(self, limit: int,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self.on_change = on_change

    def try_enter(self) -> bool:
        """Admit one request if there is room."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        if self.on_change is not None:
            self.on_change(self.in_flight)
        return True

    def leave(self) -> None:
        """A request admitted by `try_enter` finished."""
        self.in_flight -= 1
        if self.on_change is not None:
            self.on_change(self.in_flight)


class ConcurrencyGateMiddleware:
    """ASGI middleware: admit work requests through `gate`, 429 + Retry-After when full.

    Also bounds each admitted request by `timeout_s`: when it passes, the handler is
    cancelled and, if no answer has started, the client gets 503 + Retry-After.
    """

    def __init__(
        self,
        app: Any,
        gate: ConcurrencyGate,
        retry_after_s: int = 1,
        timeout_s: float | None = None,
        methods: frozenset[str] = WORK_METHODS,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self.methods = methods
        self.on_reject = on_reject

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in self.methods:
            await self.app(scope, receive, send)
            return
        retry = {"Retry-After": str(self.retry_after_s)}
        if not self.gate.try_enter():
            if self.on_reject is not None:
                self.on_reject("capacity")
            response = error_response(
                429,
                f"server is at capacity ({self.gate.limit} concurrent requests, "
                f"max_concurrent_requests); retry after {self.retry_after_s}s",
                code="server_busy", headers=retry,
            )
            await response(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, tracked)
        except TimeoutError:
            if self.on_reject is not None:
                self.on_reject("timeout")
            if not tracked.started:
                response = error_response(
                    503, f"request did not finish within {self.timeout_s}s (request_timeout_s)",
                    code="timeout", headers=retry,
                )
                await response(scope, receive, send)
        finally:
            self.gate.leave()


# --------------------------------------------------------------------------- input checks


def check_limit(value: int, limit: int, *, name: str, setting: str,
                param: str | None = None) -> None:
    """400 when a requested count (`top_k`, `n`, ...) is over the server's limit."""
    if value > limit:
        raise APIError(400, f"{name}: {value} is over this server's limit of {limit} ({setting})",
                       param=param or name, code="limit_exceeded")


def check_not_empty(items: Sequence[Any], *, name: str, param: str | None = None) -> None:
    """400 when a list that must hold something is empty."""
    if len(items) == 0:
        raise APIError(400, f"{name}: must not be empty", param=param or _to_param(name),
                       code="empty")


def check_token_ids(token_ids: Sequence[int], vocab_size: int, *, name: str,
                    param: str | None = None) -> None:
    """400 naming the first token id outside `0..vocab_size-1` and its position.

    `min`/`max` run in C, so the common all-valid case costs two passes and no Python loop.
    """
    if not token_ids:
        return
    if min(token_ids) >= 0 and max(token_ids) < vocab_size:
        return
    for pos, tid in enumerate(token_ids):
        if not 0 <= tid < vocab_size:
            raise APIError(
                400,
                f"{name}[{pos}]: token id {tid} is outside the vocabulary (0..{vocab_size - 1})",
                param=param or _to_param(name), code="invalid_token_id",
            )


def check_length(length: int, max_model_len: int, *, name: str, param: str | None = None,
                 what: str = "tokens") -> None:
    """400 when a sequence (prompt + what will be generated) exceeds `max_model_len`."""
    if length > max_model_len:
        raise APIError(
            400,
            f"{name}: {length} {what} is longer than this model's max_model_len "
            f"({max_model_len})",
            param=param or _to_param(name), code="context_length_exceeded",
        )


def _to_param(name: str) -> str:
    """`sequences[3].token_ids` -> `sequences.3.token_ids` (message form to param form)."""
    return name.replace("[", ".").replace("]", "")
