"""Rank 0's connections to the two services: the teacher, the rollout service, the weight sync.

Built from ``services.*`` and ``sync.*`` of the config; :meth:`Services.connect` waits for both
services and runs the start-up checks; :meth:`Services.rollouts` notices a rollout service
that restarted and lost the trainer's weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.protocol import InfoResponse, RolloutResponse
from trainer.clients import RolloutClient, TeacherClient
from trainer.config import TrainConfig
from trainer.errors import FatalError
from trainer.retry import RetryPolicy
from trainer.service_checks import check_services
from trainer.weight_sync import WeightSync

__all__ = ["Services", "connect_services"]

log = logging.getLogger("opd.trainer")


class Services:
    """Rank 0's connections: the teacher, the rollout service, and the weight sync."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        s = cfg.services
        retry = RetryPolicy(
            max_attempts=s.max_attempts,
            deadline_s=s.retry_timeout_s,
            initial_s=s.backoff_initial_s,
            max_s=s.backoff_max_s,
        )
        common: dict[str, Any] = {
            "api_key": os.environ.get(s.api_key_env) or None,
            "timeout_s": s.request_timeout_s,
            "retry": retry,
            "max_connections": s.max_concurrency,
        }
        self.cfg = cfg
        self.teacher = TeacherClient("teacher", s.teacher_url, **common)
        self.rollout = RolloutClient("rollout", s.rollout_url, **common)
        self.sync = WeightSync(
            self.rollout,
            method=cfg.sync.method,
            staging_dir=run_dir / "weights",
            shared_dir=Path(cfg.sync.shared_dir) if cfg.sync.shared_dir else None,
            service_dir=cfg.sync.service_dir,
        )

    def connect(self, local_fingerprint: str | None) -> tuple[InfoResponse, InfoResponse]:
        """Wait for both services (with backoff, up to ``services.ready_timeout_s``) and
        check they fit together (raises StartupError)."""
        deadline = time.monotonic() + self.cfg.services.ready_timeout_s
        teacher = self.teacher.wait_ready(self.cfg.services.ready_timeout_s)
        rollout = self.rollout.wait_ready(max(1.0, deadline - time.monotonic()))
        key = "tokenizer_fingerprint_components"
        t_parts, r_parts = self.teacher.info_raw.get(key), self.rollout.info_raw.get(key)
        components = (
            (t_parts, r_parts) if isinstance(t_parts, dict) and isinstance(r_parts, dict) else None
        )
        check_services(self.cfg, teacher, rollout, local_fingerprint, components)
        return teacher, rollout

    # RolloutClient.rollouts' signature on purpose: this wrapper forwards every argument.
    def rollouts(
        self,
        prompts: Sequence[dict[str, Any]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> RolloutResponse:
        """``/v1/rollouts`` that notices a restarted rollout service.

        A restarted service serves its initial weights at version 0: the answer's
        ``policy_version`` is then below what was confirmed before the request was sent.
        The current weights are pushed again and the request repeated.
        """
        for _ in range(3):
            expected = self.sync.version
            resp = self.rollout.rollouts(
                prompts, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed
            )
            served = min((it.policy_version for it in resp.data), default=resp.policy_version)
            if not self.sync.restore(served, expected):
                return resp
        raise FatalError("the rollout service keeps losing its weights (restarting in a loop?)")

    def close(self) -> None:
        """Close the HTTP clients."""
        self.teacher.close()
        self.rollout.close()


def connect_services(cfg: TrainConfig, run_dir: Path, tokenizer_path: str) -> Services:
    """Connect to both services and check them against the student tokenizer at
    ``tokenizer_path`` (what the trainer computes logprobs with)."""
    from transformers import AutoTokenizer

    from services.engine import tokenizer_fingerprint

    local = tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=cfg.student.trust_remote_code
        )
    )
    services = Services(cfg, run_dir)
    try:
        teacher, rollout = services.connect(local)
    except BaseException:
        services.close()
        raise
    log.info(
        "teacher %s (%s, %s) and rollout %s (%s, policy_version %s) ready; tokenizers match",
        teacher.model,
        teacher.backend,
        teacher.device,
        rollout.model,
        rollout.backend,
        rollout.policy_version,
    )
    return services
