"""Teacher settings and app: the common service app plus `/v1/score` and the OpenAI routes."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import Field

from services.common.app import create_app
from services.common.openai_routes import openai_router
from services.common.settings import ServiceSettings
from services.engine.base import Engine
from services.teacher.routes import score_router


class TeacherSettings(ServiceSettings):
    """Serve a frozen teacher model: /v1/score plus OpenAI-compatible completions."""

    port: int = Field(8001, ge=0, le=65535, description="port to bind")


def build_app(settings: TeacherSettings, engine: Engine | None = None) -> FastAPI:
    """The teacher's app; `engine` replaces `make_engine(settings.engine_config())` if given."""
    return create_app(settings, service="teacher", routers=[score_router(), openai_router()],
                      engine=engine, title="opd teacher")
