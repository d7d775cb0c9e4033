"""Optional bearer-key authentication (`OPD_API_KEY` / `--api-key`).

When a key is configured every request must carry `Authorization: Bearer KEY` (what the
official `openai` client sends for `api_key=KEY`); otherwise it gets 401 with OpenAI's error
body. `/health`, `/ready` and `/metrics` stay open so load balancers, orchestrators and
Prometheus need no secret (they reveal no model output). Everything else, `/info` and
`/v1/models` included, is behind the key. The comparison is constant-time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

from services.common.errors import error_response

OPEN_PATHS: frozenset[str] = frozenset({"/health", "/ready", "/metrics"})


class BearerAuthMiddleware:
    """ASGI middleware: 401 unless `Authorization: Bearer <api_key>` (when a key is set)."""

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        open_paths: Iterable[str] = OPEN_PATHS,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.open_paths = frozenset(open_paths)
        self.on_reject = on_reject

    def _authorized(self, scope: Any) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    token.strip(), self.api_key or b""
                )
        return False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or self.api_key is None
            or scope.get("path") in self.open_paths
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
        ):
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            if self.on_reject is not None:
                self.on_reject()
            has_header = any(name == b"authorization" for name, _ in scope.get("headers", ()))
            message = (
                "invalid API key" if has_header
                else "missing API key: send 'Authorization: Bearer <key>'"
            )
            response = error_response(
                401, message, param="Authorization", code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
