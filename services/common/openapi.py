"""OpenAPI: every route documents each error status it can return, with OpenAI's error body.

Two sources of errors, documented in two places:

- a route's own errors (404 for an unknown model, 409 for an old weights version, 503 until
  the engine is loaded): listed in its decorator, `responses=error_responses(404, 503)`;
- the middleware's, the same for every route of a kind: `install_openapi(app, ...)` adds 401
  (when an API key is set, outside the open paths) and 413 / 429 / 503 (timeout) on work
  methods when the schema is built.

FastAPI documents a 422 for every route with parameters; these apps never send it (validation
errors are 400, see services/common/errors.py), so the schema replaces it with 400 and drops
FastAPI's validation-error models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.protocol import ErrorResponse

# What each status means on these services; the error body's `code` says which case it was.
STATUS_DESCRIPTIONS: dict[int, str] = {
    400: "invalid request: `error.param` names the field (validation, limits, unsupported "
         "options, invalid JSON)",
    401: "missing or wrong API key (send `Authorization: Bearer KEY`)",
    403: "forbidden (a weights path outside `--weights-dir`, or loading by path disabled)",
    404: "not served here (an unknown model name)",
    409: "version conflict: the weights version is not newer than the one serving",
    413: "request body larger than this server's limit (`max_body_bytes` / "
         "`max_upload_bytes`)",
    429: "at capacity (`max_concurrent_requests`); retry after `Retry-After` seconds",
    503: "not ready (model loading or failed to load) or the request ran past "
         "`request_timeout_s`; retry after `Retry-After` seconds when sent",
}

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer"}}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}

MIDDLEWARE_WORK_STATUSES: tuple[int, ...] = (413, 429, 503)

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_FASTAPI_VALIDATION_MODELS = ("HTTPValidationError", "ValidationError")


def error_response_doc(status: int, description: str | None = None,
                       model: type = ErrorResponse) -> dict[str, Any]:
    """One `responses=` entry: the OpenAI error body `model` under `status`'s description."""
    doc: dict[str, Any] = {"model": model,
                           "description": description or STATUS_DESCRIPTIONS[status]}
    if status in _HEADERS:
        doc["headers"] = _HEADERS[status]
    return doc


def error_responses(*statuses: int, descriptions: Mapping[int, str] | None = None,
                    models: Mapping[int, type] | None = None,
                    extra: Mapping[int | str, dict[str, Any]] | None = None,
                    ) -> dict[int | str, dict[str, Any]]:
    """The `responses=` dict of a route that can answer `statuses` with an OpenAI error.

    `descriptions` overrides a status's text, `models` its body model (a subclass of
    `ErrorResponse` with more fields); `extra` is merged in as is (e.g. a second content type
    for 200).
    """
    descriptions = descriptions or {}
    models = models or {}
    out: dict[int | str, dict[str, Any]] = {
        s: error_response_doc(s, descriptions.get(s), models.get(s, ErrorResponse))
        for s in statuses
    }
    out.update(extra or {})
    return out


def _openapi_error(status: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"description": STATUS_DESCRIPTIONS[status],
                           "content": {"application/json": {"schema": _ERROR_REF}}}
    if status in _HEADERS:
        doc["headers"] = _HEADERS[status]
    return doc


def _ensure_error_schema(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" in components:
        return
    model_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(model_schema.pop("$defs", {}))
    components["ErrorResponse"] = model_schema


def complete_schema(schema: dict[str, Any], *, auth: bool, open_paths: Iterable[str],
                    work_methods: Iterable[str]) -> dict[str, Any]:
    """Add the middleware's statuses to every operation of `schema`, 422 -> 400 (in place)."""
    open_set = set(open_paths)
    work = {m.lower() for m in work_methods}
    added = False
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            statuses: list[int] = []
            # A path parameter is any string: only a body or a query can fail validation.
            validated = "requestBody" in operation or any(
                param.get("in") != "path" for param in operation.get("parameters", ()))
            if responses.pop("422", None) is not None and validated:
                statuses.append(400)
            if auth and path not in open_set:
                statuses.append(401)
            if method in work:
                statuses.extend(MIDDLEWARE_WORK_STATUSES)
            for status in statuses:
                if str(status) not in responses:
                    responses[str(status)] = _openapi_error(status)
                    added = True
    if added:
        _ensure_error_schema(schema)
    # Only the 422s just removed referred to these.
    components = schema.get("components", {}).get("schemas", {})
    for name in _FASTAPI_VALIDATION_MODELS:
        components.pop(name, None)
    return schema


def install_openapi(app: FastAPI, *, auth: bool, open_paths: Iterable[str],
                    work_methods: Iterable[str]) -> None:
    """Make `app.openapi()` build the completed schema (once; FastAPI caches it)."""
    open_paths = tuple(open_paths)
    work_methods = tuple(work_methods)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 openapi_version=app.openapi_version,
                                 description=app.description, routes=app.routes)
            app.openapi_schema = complete_schema(schema, auth=auth, open_paths=open_paths,
                                                 work_methods=work_methods)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
