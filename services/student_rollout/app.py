"""The student rollout app: common service app + /v1/rollouts + /v1/weights + OpenAI routes.

The policy version lives on `app.state.versions` (`PolicyVersions`), the weight-update logic
on `app.state.weights` (`WeightsManager`). Once the engine is loaded it is put behind a
`LeasedEngine`, so the shared OpenAI routes also run every model call under a read lease and
never see weights mid-swap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from services.common.app import ServiceState, create_app
from services.common.openai_routes import openai_router
from services.engine.base import Engine
from services.student_rollout.broadcast import BroadcastManager, broadcast_router
from services.student_rollout.routes import rollout_router
from services.student_rollout.settings import RolloutSettings
from services.student_rollout.versioning import LeasedEngine, PolicyVersions
from services.student_rollout.weights import WeightsManager, weights_router

SERVICE = "student_rollout"


def build_app(settings: RolloutSettings, engine: Engine | None = None) -> FastAPI:
    """The rollout service's app; `engine` replaces `make_engine(settings.engine_config())`."""
    versions = PolicyVersions(settings.initial_version)
    manager = WeightsManager(settings, versions)
    broadcaster = BroadcastManager(manager, versions)

    async def on_ready(state: ServiceState) -> None:
        assert state.engine is not None
        # Reads safetensors headers only: cheap, but keep file I/O off the event loop anyway.
        await asyncio.to_thread(manager.start)
        state.engine = LeasedEngine(state.engine, versions)
        manager.on_version = state.metrics.policy_version
        state.metrics.policy_version(versions.version)

    def info_extra() -> dict[str, Any]:
        return {"policy_version": versions.version}

    app = create_app(
        settings,
        service=SERVICE,
        routers=[rollout_router(), weights_router(), broadcast_router(), openai_router()],
        info_extra=info_extra,
        engine=engine,
        # The upload route enforces its own limit (max_upload_bytes) while streaming; the
        # JSON load and broadcast requests keep the ordinary body limit.
        body_limit_overrides={
            "/v1/weights/load": settings.max_body_bytes,
            "/v1/weights/broadcast": settings.max_body_bytes,
            "/v1/weights": None,
        },
        on_ready=on_ready,
        title="opd student rollout",
    )
    app.state.versions = versions
    app.state.weights = manager
    app.state.broadcast = broadcaster

    # Remove the staging directory on shutdown, after the common lifespan has stopped the
    # engine (so no swap can still be reading from it).
    inner_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        try:
            async with inner_lifespan(app_) as value:
                yield value
        finally:
            broadcaster.close()
            manager.close()

    app.router.lifespan_context = lifespan
    return app
