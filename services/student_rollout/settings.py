"""Settings of the student rollout service (flags and `OPD_*` env, see services.common.settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from services.common.settings import ServiceSettings
from services.engine.base import EngineConfig


class RolloutSettings(ServiceSettings):
    """Serve the student policy: sample rollouts with logprobs and take weight updates."""

    port: int = Field(8002, ge=0, le=65535, description="port to bind")
    # Shaped like trainer SyncConfig's directories on purpose: those are the trainer's view of
    # the same disk, and config modules must not import service code.
    weights_dir: Path | None = Field(
        None,
        description="directory that checkpoints loaded by path (POST /v1/weights/load) must lie "
        "inside; without it load-by-path is refused (403)",
    )
    staging_dir: Path | None = Field(
        None,
        description="where uploaded checkpoints (PUT /v1/weights) are staged before validation; "
        "a private directory is made inside it (default: the system temp dir)",
    )
    max_upload_bytes: int = Field(
        64 * 1024**3,
        ge=1,
        description="largest checkpoint accepted by PUT /v1/weights (413 beyond, checked while "
        "streaming)",
    )
    initial_version: int = Field(
        0, ge=0, description="policy_version of the weights loaded at start"
    )

    def engine_config(self) -> EngineConfig:
        """The engine settings, with vLLM's weight transfer on (the broadcast transport)."""
        return super().engine_config().model_copy(update={"weight_transfer": True})

    @field_validator("weights_dir", "staging_dir")
    @classmethod
    def _resolve(cls, value: Path | None) -> Path | None:
        # Resolved once at start so every containment check compares real paths.
        return None if value is None else value.expanduser().resolve()
