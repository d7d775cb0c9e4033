"""Teacher settings and app: the common service app plus `/v1/score` and the OpenAI routes."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import Field

from services.common.app import ServiceState, create_app
from services.common.openai_routes import openai_router
from services.common.settings import ServiceSettings
from services.engine.base import Engine
from services.teacher.routes import score_router


class TeacherSettings(ServiceSettings):
    """Serve a frozen teacher model: /v1/score plus OpenAI-compatible completions."""

    port: int = Field(8001, ge=0, le=65535, description="port to bind")
    prefix_sharing: bool = Field(
        True,
        description="/v1/score: compute a prefix shared by several sequences once (hf: "
        "shared KV cache; vllm: prefix cache); results are the same to float32 rounding",
    )


def set_prefix_sharing(engine: Engine, on: bool) -> None:
    """Apply `prefix_sharing` to a loaded engine of either backend."""
    if engine.info().backend == "vllm":
        from services.engine.vllm.scoring import set_prefix_sharing as set_vllm

        set_vllm(engine, on)
    elif hasattr(engine, "prefix_sharing"):
        engine.prefix_sharing = on


def build_app(settings: TeacherSettings, engine: Engine | None = None) -> FastAPI:
    """The teacher's app; `engine` replaces `make_engine(settings.engine_config())` if given."""

    def on_ready(state: ServiceState) -> None:
        assert state.engine is not None
        set_prefix_sharing(state.engine, settings.prefix_sharing)

    return create_app(settings, service="teacher", routers=[score_router(), openai_router()],
                      engine=engine, title="opd teacher", on_ready=on_ready)
