"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure a client can cause is a 4xx whose `message` names the field (and the sequence
index and position where there is one) and whose `param` is the field's dotted path, e.g.
`sequences.3.token_ids`. Anything unexpected (an engine bug, an OOM) is a 500 for that request
only: it is logged with its traceback and the server keeps serving.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.engine.base import EngineRequestError

logger = logging.getLogger("opd.services")

# OpenAI's `type` for each status we send; clients switch on it (openai-python maps statuses
# to exception classes, the type is informative).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """Raise anywhere in a route to answer with OpenAI's error body.

    `param` is the dotted field path (`sequences.3.start`); `headers` are added to the answer
    (e.g. `Retry-After`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body (OpenAI's error object)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """This error as a response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,  # noqa: A002
    param: str | None = None,
    code: str | int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSONResponse with OpenAI's error body (for middleware, which cannot raise)."""
    return APIError(status, message, type, param, code, headers).response()


# --------------------------------------------------------------------------- validation errors

# Pydantic puts union-member tags in `loc` (`str`, `list[int]`, `function-after[...]`); they
# are not field names, and naming them to a client only confuses.
_TAG_CHARS = set("[]()- ")
_TAG_WORDS = {"str", "int", "float", "bool", "list", "dict", "none", "B64Array"}


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (bool(_TAG_CHARS & set(part)) or part in _TAG_WORDS)


def format_loc(loc: Iterable[Any]) -> str:
    """`("sequences", 3, "token_ids", 17)` -> `sequences[3].token_ids[17]` (for messages)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


# Errors about a whole object (a model validator, "not an object") keep the object's index in
# `param` (`sequences.3`); errors about one element of a list of scalars name the list field.
_OBJECT_ERRORS = {"value_error", "assertion_error", "model_type", "model_attributes_type",
                  "dict_type"}


def param_path(loc: Sequence[Any], error_type: str | None = None) -> str | None:
    """The `param` of an error at `loc`: dotted, without a final scalar-element position.

    `("sequences", 3, "token_ids", 17)` -> `sequences.3.token_ids`: `param` names the field,
    the message names the position. An error about the object `sequences[3]` itself
    (`error_type` of a validator) keeps it: `sequences.3`.
    """
    parts = list(loc)
    if parts and isinstance(parts[-1], int) and error_type not in _OBJECT_ERRORS:
        parts.pop()
    return ".".join(str(p) for p in parts) or None


def _clean_loc(loc: Sequence[Any]) -> tuple[Any, ...]:
    parts = [p for p in loc if not _is_tag(p)]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return tuple(parts)


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    # "Value error, give exactly one of ..." -> "give exactly one of ..."
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def validation_error_to_api_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Pydantic / FastAPI validation errors -> one 400 naming every bad field (first 5).

    Errors at the same location (a value that matches no member of a union) are merged into
    one sentence so the client reads "prompt: expected X or Y" and not five lines.
    """
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        pos = first.get("loc", ("body", None))[-1]
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"request body is not valid JSON: {detail} (at character {pos})",
                        code="invalid_json")
    merged: dict[tuple[Any, ...], list[str]] = {}
    first_type: str | None = None
    for err in errors:
        loc = _clean_loc(err.get("loc", ()))
        if first_type is None:
            first_type = str(err.get("type"))
        msgs = merged.setdefault(loc, [])
        msg = _message(err)
        if msg not in msgs:
            msgs.append(msg)
    parts = []
    for loc, msgs in list(merged.items())[:5]:
        where = format_loc(loc) or "body"
        if where == "body" and any("Field required" in m for m in msgs):
            parts.append("request body is required (a JSON object)")
            continue
        parts.append(f"{where}: {' or '.join(msgs)}")
    extra = len(merged) - 5
    message = "; ".join(parts) + (f"; and {extra} more" if extra > 0 else "")
    first_loc = next(iter(merged))
    return APIError(400, message, param=param_path(first_loc, first_type), code="invalid_value")


# --------------------------------------------------------------------------- handlers


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    if exc.status >= 500:
        logger.error("%s %s -> %d: %s", request.method, request.url.path, exc.status,
                     exc.message)
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return validation_error_to_api_error(list(exc.errors())).response()


_PATH_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])+(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*)")


def engine_request_error_to_api_error(exc: Exception) -> APIError:
    """An engine's `EngineRequestError` (a request the backend cannot serve as asked) -> 400.

    Engines name the field in the message (`sequences[3].token_ids[2]: ...`,
    `sequences[0]: temperature 5 is outside [0.01, 2] ...`); `param` is derived from it.
    """
    message = str(exc)
    param = None
    if "temperature" in message:
        param = "temperature"
    else:
        match = _PATH_PREFIX.match(message)
        if match:
            parts = re.findall(r"[A-Za-z_]\w*|\d+", match.group(1))
            param = param_path([int(p) if p.isdigit() else p for p in parts])
    return APIError(400, message, param=param, code="unsupported_by_engine")


async def _engine_request_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return engine_request_error_to_api_error(exc).response()


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    headers = dict(exc.headers or {})
    return error_response(status, message, headers=headers)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    # The request failed, the process did not: log the traceback, answer 500, keep serving.
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                          code="internal_error")


class TrackedSend:
    """An ASGI `send` that remembers whether the response head went out: after that an error
    can no longer be answered with an error body, only by closing the connection."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class CatchAllMiddleware:
    """Turn an exception that escaped every handler into a 500 for that request.

    Starlette's own fallback answers 500 too but then re-raises into the server (a second,
    louder traceback per failure); this one sits inside the metrics middleware so the 500 is
    counted, logs once, and lets the connection close cleanly when the answer had already
    started.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the point of this middleware
            logger.error("unhandled error in %s %s", scope.get("method"), scope.get("path"),
                         exc_info=exc)
            if not tracked.started:
                response = error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                                          code="internal_error")
                await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of `app` an OpenAI error body (400 for validation, not FastAPI's 422)."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(EngineRequestError, _engine_request_error_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
