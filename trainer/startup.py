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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from trainer.config import TrainConfig
from trainer.data import Example, PromptSampler, build_messages, load_gsm8k
from trainer.errors import StartupError
from trainer.teacher_context import TeacherContext, chat_ids, split_few_shot

__all__ = ["Prompts", "find_checkpoint", "load_prompts", "student_tokenizer_path"]

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


@dataclass
class Prompts:
    """What :func:`load_prompts` decides: the training prompts, the held-out problems, the
    run's length and the teacher's context."""

    sampler: PromptSampler
    evals: list[Example]  # rank 0 only; empty elsewhere
    total_steps: int
    teacher_context: TeacherContext


def load_prompts(cfg: TrainConfig, tokenizer: Any, is_main: bool) -> Prompts:
    """The training prompts that fit (as a seeded sampler), the evaluation problems, the
    number of steps the run takes, and the teacher context.

    A prompt fits when the student's prompt and, with a teacher context, the teacher's
    prompt each leave ``rollout.max_tokens`` within ``trainer.max_model_len``; the others are
    dropped with a warning. A context too long for any prompt is a :class:`StartupError`.
    """
    train = load_gsm8k("train", cfg.data.source, limit=cfg.data.train_limit)
    c = cfg.teacher.context
    try:
        shots, train = split_few_shot(train, c.few_shot)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    context = TeacherContext(c, shots, tokenizer)
    limit = cfg.trainer.max_model_len - cfg.rollout.max_tokens
    if context.active and context.context_tokens() >= limit:
        raise StartupError(
            f"the teacher context (teacher.context: {context.context_tokens()} tokens of system "
            f"prompt and {c.few_shot} few-shot turns) leaves no room for a question: "
            f"trainer.max_model_len ({cfg.trainer.max_model_len}) - rollout.max_tokens "
            f"({cfg.rollout.max_tokens}) = {limit}. Lower teacher.context.few_shot or raise "
            "trainer.max_model_len (and the services' --max-model-len)"
        )
    fits = [ex for ex in train if _fits(tokenizer, context, ex, limit)]
    if len(fits) < len(train):
        who = "student or teacher prompt" if context.active else "prompt"
        log.warning(
            "dropped %d training prompts whose %s is longer than %d tokens "
            "(trainer.max_model_len - rollout.max_tokens)",
            len(train) - len(fits),
            who,
            limit,
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
    return Prompts(sampler, evals, steps, context)


def _fits(tokenizer: Any, context: TeacherContext, ex: Example, limit: int) -> bool:
    student = chat_ids(tokenizer, build_messages(ex.question))
    return len(student) <= limit and len(context.prompt_ids(ex, student)) <= limit
