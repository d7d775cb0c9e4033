"""What a run decides before its first step: where it resumes from, and its prompts.

The :class:`~trainer.loop.Trainer` sets up in this order: find the checkpoint to resume from
(:func:`find_checkpoint`); connect to the services (rank 0; an unreachable or incompatible
service fails in seconds, before minutes of model loading); load the student
(:mod:`trainer.student_state`); load the prompts (:func:`load_prompts`); restore the
checkpoint's state.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from trainer.checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from trainer.config import TrainConfig
from trainer.data import Example, PromptSampler, build_messages, load_gsm8k
from trainer.errors import StartupError

__all__ = ["find_checkpoint", "load_prompts", "student_tokenizer_path"]

log = logging.getLogger("opd.trainer")


def find_checkpoint(run_dir: Path, resume: bool) -> Checkpoint | None:
    """The checkpoint to continue from (``--resume``), refusing to overwrite a run without it."""
    existing = list_checkpoints(run_dir)
    if not resume:
        if existing:
            raise StartupError(
                f"{run_dir} already holds checkpoints (latest step {existing[-1][0]}); "
                f"continue it with `opd train --resume {run_dir}` or set another run_dir"
            )
        return None
    if not existing:
        log.warning("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
        return None
    return load_checkpoint(run_dir)


def student_tokenizer_path(cfg: TrainConfig, ckpt: Checkpoint | None) -> str:
    """Where the student tokenizer is read from (a checkpoint carries its own)."""
    return str(ckpt.model_dir) if ckpt else (cfg.student.tokenizer or cfg.student.model)


def load_prompts(
    cfg: TrainConfig, tokenizer: Any, is_main: bool
) -> tuple[PromptSampler, list[Example], int]:
    """The training prompts that fit (as a seeded sampler), the evaluation problems (rank 0
    only; empty elsewhere) and the number of steps the run takes."""
    train = load_gsm8k("train", cfg.data.source, limit=cfg.data.train_limit)
    limit = cfg.trainer.max_model_len - cfg.rollout.max_tokens
    fits = [ex for ex in train if _prompt_len(tokenizer, ex) <= limit]
    if len(fits) < len(train):
        log.warning(
            "dropped %d training prompts longer than %d tokens", len(train) - len(fits), limit
        )
    if not fits:
        raise StartupError(
            f"no training prompt fits in {limit} tokens (max_model_len - max_tokens)"
        )
    steps = math.ceil(len(fits) * cfg.trainer.epochs / cfg.rollout.prompts_per_step)
    if cfg.trainer.total_steps is not None:
        steps = min(steps, cfg.trainer.total_steps)
    sampler = PromptSampler(
        fits, seed=cfg.seed, shuffle=cfg.data.shuffle, max_epochs=cfg.trainer.epochs
    )
    evals = load_gsm8k("test", cfg.data.source, limit=cfg.eval.limit) if is_main else []
    return sampler, evals, steps


def _prompt_len(tokenizer: Any, ex: Example) -> int:
    ids = tokenizer.apply_chat_template(
        build_messages(ex.question), add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)
