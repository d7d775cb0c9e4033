"""The code's own defaults that the deployment files (Compose, Helm) must agree with: the
services' settings classes and the trainer's metrics port, read from the code, never copied."""

from __future__ import annotations

from typing import Any


def teacher_settings() -> Any:
    """The teacher service's settings class."""
    from services.teacher.app import TeacherSettings

    return TeacherSettings


def rollout_settings() -> Any:
    """The student rollout service's settings class."""
    from services.student_rollout.settings import RolloutSettings

    return RolloutSettings


def default_port(settings: Any) -> int:
    """The port a service listens on when nothing overrides it."""
    return int(settings.model_fields["port"].default)


def trainer_metrics_port() -> int:
    """The port of the trainer's Prometheus endpoint when nothing overrides it."""
    from trainer.config import LoggingConfig

    return int(LoggingConfig.model_fields["metrics_port"].default)
