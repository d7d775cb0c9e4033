"""What both services share: the app factory and its parts.

- `settings`: `ServiceSettings` (`OPD_*` env, engine fields, limits), `parse_settings(cls, argv)`
  (flags from fields; flag > env > default).
- `app`: `create_app(settings, *, service, routers, info_extra, engine, body_limit_overrides,
  on_ready)`, `serve(app, settings)`, `ServiceState`, dependencies `get_state`,
  `require_engine`, `StateDep`, `EngineDep`.
- `errors`: `APIError(status, message, type, param, code, headers)` -> OpenAI error body.
- `limits`: body size, concurrency gate + timeout, `check_*` input checks with named fields.
- `auth`: optional bearer key; `/health`, `/ready`, `/metrics` stay open.
- `openapi`: `error_responses(*statuses)` for route decorators and `install_openapi`, which
  adds the middleware's statuses to every route and drops FastAPI's unused 422.
- `metrics`: the Prometheus metrics of docs/metrics.md (`ServiceMetrics`) and `/metrics`.
- `openai_routes`: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (`openai_router()`).
- `responses`: `json_response` (pydantic-core JSON) and `openai_response` (JSON or
  server-sent events).

Submodules are imported explicitly (`from services.common.app import create_app`), so importing
this package costs nothing.
"""
