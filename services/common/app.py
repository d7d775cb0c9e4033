"""The app factory both services use: engine lifecycle, probes, /info, errors, auth, limits, metrics.

```python
app = create_app(settings, service="teacher", routers=[teacher_router, openai_router()])
```

Lifecycle: the lifespan builds the engine (`services.engine.make_engine`) and loads it in a
background task, so the process answers `GET /health` (200) at once and `GET /ready` 503 until
the model is loaded (503 with the reason if loading failed; the process stays up so the reason
can be read). Work routes get the engine through `Depends(require_engine)`, which answers 503 +
`Retry-After` until then. On exit the engine is shut down.

Middleware, outermost first: metrics (counts everything, rejections included), catch-all 500,
bearer auth, body size, concurrency gate + timeout. The order is deliberate: an
unauthenticated client cannot take a concurrency slot, and a refused request is still counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.auth import OPEN_PATHS, BearerAuthMiddleware
from services.common.errors import APIError, CatchAllMiddleware, install_error_handlers
from services.common.limits import (
    WORK_METHODS,
    BodySizeLimitMiddleware,
    ConcurrencyGate,
    ConcurrencyGateMiddleware,
)
from services.common.metrics import MetricsMiddleware, ServiceMetrics, metrics_router
from services.common.openapi import error_responses, install_openapi
from services.common.settings import ServiceSettings
from services.engine.base import Engine, EngineInfo
from services.protocol import HealthResponse, InfoResponse, NotReadyResponse, ReadyResponse

logger = logging.getLogger("opd.services")

InfoExtra = Callable[[], Mapping[str, Any]]
ReadyHook = Callable[["ServiceState"], Awaitable[None] | None]


def _version() -> str:
    # The installed distribution's version: services must not import the `opd` CLI package.
    try:
        from importlib.metadata import version

        return version("opd")
    except Exception:  # noqa: BLE001 - a version string must never break /info
        return "unknown"


class ServiceState:
    """What the routes of one app share: settings, engine, status, metrics.

    Reached from a route as `request.app.state.opd` (or `Depends(get_state)`).
    """

    def __init__(self, settings: ServiceSettings, service: str,
                 info_extra: InfoExtra | None = None) -> None:
        self.settings = settings
        self.service = service
        self.info_extra = info_extra
        self.metrics = ServiceMetrics(service)
        self.gate = ConcurrencyGate(settings.max_concurrent_requests,
                                    on_change=self.metrics.queue_depth)
        self.engine: Engine | None = None
        self.engine_info: EngineInfo | None = None
        self.ready = False
        self.load_error: str | None = None
        self.started_at = time.time()
        self.ready_at: float | None = None

    @property
    def status(self) -> str:
        """"loading", "ready" or "failed"."""
        if self.ready:
            return "ready"
        return "failed" if self.load_error else "loading"

    def require_engine(self) -> Engine:
        """The loaded engine, or APIError 503 (+ Retry-After while loading)."""
        if self.ready and self.engine is not None:
            return self.engine
        self.metrics.rejected("not_ready")
        if self.load_error:
            raise APIError(503, f"model failed to load: {self.load_error}",
                           code="model_load_failed")
        raise APIError(503, f"model {self.settings.model!r} is still loading",
                       code="model_loading",
                       headers={"Retry-After": str(max(1, self.settings.retry_after_s))})

    def served_model_name(self) -> str:
        """The name clients use in `model`."""
        if self.engine_info is not None:
            return self.engine_info.served_model_name
        return self.settings.served_model_name or self.settings.model

    def info(self) -> InfoResponse:
        """`GET /info` (needs the engine loaded)."""
        self.require_engine()
        info = self.engine_info
        assert info is not None
        fields: dict[str, Any] = {
            "service": self.service,
            **dataclasses.asdict(info),
            "limits": self.settings.limits(),
            "version": _version(),
        }
        if self.info_extra is not None:
            fields.update(self.info_extra())
        return InfoResponse(**fields)


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the app's `ServiceState`."""
    return request.app.state.opd


def require_engine(request: Request) -> Engine:
    """FastAPI dependency: the loaded engine; 503 (+ Retry-After) until it is."""
    return get_state(request).require_engine()


# Route signatures: `async def route(body: X, state: StateDep, engine: EngineDep)`.
StateDep = Annotated[ServiceState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(require_engine)]


def _probe_router(state: ServiceState) -> APIRouter:
    router = APIRouter()

    @router.get("/health", tags=["probes"], response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Process is up (200 even while the model loads)."""
        return HealthResponse(status="ok", engine=state.status, service=state.service)

    @router.get("/ready", tags=["probes"], response_model=ReadyResponse,
                responses=error_responses(503, descriptions={
                    503: "not ready: the model is loading (with `Retry-After`), failed to "
                         "load, or the engine is broken; `status` says which"},
                    models={503: NotReadyResponse}))
    async def ready() -> Any:
        """200 once the model is loaded; 503 with the reason before (or if loading failed)."""
        headers: dict[str, str] = {}
        if state.ready:
            broken = state.engine.health() if state.engine is not None else None
            if broken is None:
                return {"status": "ready", "model": state.served_model_name()}
            status, code, message = "broken", "engine_broken", f"the engine cannot serve: {broken}"
        elif state.load_error:
            status, code = state.status, f"model_{state.status}"
            message = f"model failed to load: {state.load_error}"
        else:
            status, code = state.status, f"model_{state.status}"
            message = f"model {state.settings.model!r} is still loading"
            headers = {"Retry-After": str(max(1, state.settings.retry_after_s))}
        return JSONResponse(
            {"status": status,
             "error": {"message": message, "type": "service_unavailable_error",
                       "param": None, "code": code}},
            status_code=503, headers=headers,
        )

    @router.get("/info", response_model=InfoResponse, tags=["probes"],
                responses=error_responses(503))
    async def info() -> InfoResponse:
        """Model, backend, limits and tokenizer fingerprint (503 until loaded)."""
        return state.info()

    return router


def create_app(
    settings: ServiceSettings,
    *,
    service: str,
    routers: Iterable[APIRouter] = (),
    info_extra: InfoExtra | None = None,
    engine: Engine | None = None,
    body_limit_overrides: Mapping[str, int | None] | None = None,
    on_ready: ReadyHook | None = None,
    title: str | None = None,
) -> FastAPI:
    """Build a service app.

    - `service`: the `service` label of metrics and `/info` (`teacher` | `student_rollout`).
    - `routers`: the service's own routes (and usually `openai_router()`), added after the
      common ones (`/health`, `/ready`, `/info`, `/metrics`).
    - `info_extra`: called on each `/info`; its keys are merged into the answer (e.g.
      `{"policy_version": 3}`).
    - `engine`: an engine object to use instead of `make_engine(settings.engine_config())`
      (tests, benchmarks); it is started and shut down by the app either way.
    - `body_limit_overrides`: path prefix -> byte limit (None: unlimited) for routes whose
      bodies are legitimately larger than `max_body_bytes` (a weights upload).
    - `on_ready`: awaited once the engine is loaded, before `/ready` turns 200.
    """
    state = ServiceState(settings, service, info_extra)

    async def load() -> None:
        try:
            eng = engine
            if eng is None:
                from services.engine import make_engine

                # Building may import heavy modules; keep the loop free for /health.
                eng = await asyncio.to_thread(make_engine, settings.engine_config())
            state.engine = eng
            await eng.start()
            state.engine_info = eng.info()
            if on_ready is not None:
                result = on_ready(state)
                if asyncio.iscoroutine(result):
                    await result
            state.ready = True
            state.ready_at = time.time()
            logger.info("%s ready: %s (%s, %s) in %.1fs", service,
                        state.engine_info.served_model_name, state.engine_info.backend,
                        state.engine_info.device, state.ready_at - state.started_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported on /ready, the process stays up
            state.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("%s: model failed to load", service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(load(), name=f"{service}-engine-load")
        app.state.opd_load_task = task
        try:
            yield
        finally:
            state.ready = False
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if state.engine is not None:
                try:
                    await state.engine.shutdown()
                except Exception:  # noqa: BLE001 - exiting anyway; say why it was unclean
                    logger.exception("%s: engine shutdown failed", service)

    app = FastAPI(
        title=title or f"opd {service}",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.opd = state
    install_error_handlers(app)
    install_openapi(app, auth=settings.api_key_value() is not None, open_paths=OPEN_PATHS,
                    work_methods=WORK_METHODS)

    app.include_router(_probe_router(state))
    app.include_router(metrics_router())
    for router in routers:
        app.include_router(router)

    # add_middleware prepends: the last added is the outermost.
    app.add_middleware(
        ConcurrencyGateMiddleware, gate=state.gate, retry_after_s=settings.retry_after_s,
        timeout_s=settings.request_timeout_s, on_reject=state.metrics.rejected,
    )
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
        overrides=body_limit_overrides, on_reject=lambda: state.metrics.rejected("body_size"),
    )
    app.add_middleware(
        BearerAuthMiddleware, api_key=settings.api_key_value(),
        on_reject=lambda: state.metrics.rejected("auth"),
    )
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, router_app=app)
    return app


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run `app` under uvicorn on `settings.host:settings.port` until interrupted."""
    import uvicorn

    level = settings.log_level.upper()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("opd").setLevel(level)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log)


__all__ = [
    "APIError",
    "EngineDep",
    "ServiceState",
    "StateDep",
    "create_app",
    "get_state",
    "require_engine",
    "serve",
]
