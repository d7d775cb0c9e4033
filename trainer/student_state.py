"""The trainable student and its state: load it, restore a checkpoint into it, gather its
weights for pushing, save it as a checkpoint.

Under FSDP the student is sharded over the ranks; gathering and saving are collectives and
rank 0 alone writes (:mod:`trainer.distributed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer import distributed as D
from trainer.checkpoint import (
    Checkpoint,
    capture_rng,
    restore_rng,
    save_checkpoint,
    write_hf_model,
)
from trainer.config import TrainConfig
from trainer.data import PromptSampler
from trainer.optimization import make_optimizer
from trainer.policy import PolicyModel, export_state_dict, load_student, torch_dtype

__all__ = [
    "Student",
    "gather_state",
    "load_trainable_student",
    "restore",
    "save_student",
]

log = logging.getLogger("opd.trainer")


@dataclass
class Student:
    """The trainable student: the transformers model, its tokenizer, the policy wrapper
    (sharded under FSDP), AdamW, and the dtypes it is trained, run and pushed in."""

    causal_lm: torch.nn.Module
    tokenizer: Any
    policy: PolicyModel
    optimizer: torch.optim.Optimizer
    master_dtype: torch.dtype  # trained parameters and checkpoints
    sync_dtype: torch.dtype  # pushed weights (and the checkpoint's config.json)
    autocast_dtype: torch.dtype | None


def _sync_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype pushed weights (and config.json) use: the student checkpoint's own."""
    if cfg.sync.dtype != "auto":
        return torch_dtype(cfg.sync.dtype)
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained(
        cfg.student.model, trust_remote_code=cfg.student.trust_remote_code
    )
    saved = getattr(original, "dtype", None) or getattr(original, "torch_dtype", None)
    if isinstance(saved, torch.dtype):
        return saved
    return torch_dtype(saved) if saved else torch.float32


def load_trainable_student(
    cfg: TrainConfig, ckpt: Checkpoint | None, device: torch.device, ctx: D.DistContext
) -> Student:
    """The student (from the checkpoint when resuming), sharded, with a fresh AdamW."""
    torch.manual_seed(cfg.seed)
    model_path = str(ckpt.model_dir) if ckpt else cfg.student.model
    causal_lm, tokenizer = load_student(
        cfg.student.model_copy(
            update={"model": model_path, "tokenizer": model_path if ckpt else cfg.student.tokenizer}
        ),
        device,
    )
    policy = PolicyModel(causal_lm, cfg.student.logprob_chunk_tokens)
    D.shard_policy(policy, ctx)
    autocast = cfg.student.autocast_dtype
    return Student(
        causal_lm=causal_lm,
        tokenizer=tokenizer,
        policy=policy,
        optimizer=make_optimizer(policy.parameters(), cfg.trainer),
        master_dtype=torch_dtype(cfg.student.dtype),
        sync_dtype=_sync_dtype(cfg),
        autocast_dtype=torch_dtype(autocast) if autocast else None,
    )


def restore(
    ckpt: Checkpoint,
    student: Student,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: PromptSampler,
    ctx: D.DistContext,
) -> None:
    """Load the optimizer, schedule, sampler position and RNG states of ``ckpt`` (the
    weights were loaded with the student). Collective."""
    opt = ckpt.optimizer_state() if ctx.is_main else None
    if D.broadcast_object(opt is not None, ctx):
        state = opt["optimizer"] if opt else None
        D.load_optimizer_state(student.policy, student.optimizer, state, ctx)
        scheduler.load_state_dict(D.broadcast_object(opt["scheduler"] if opt else None, ctx))
    else:
        log.warning(
            "checkpoint %s has no optimizer state: AdamW restarts from zero moments", ckpt.path
        )
        scheduler.last_epoch = ckpt.step
    sampler.load_state_dict(ckpt.state["sampler"])
    rng = ckpt.rng_states()
    if len(rng) == ctx.world_size:
        restore_rng(rng[ctx.rank])
    log.info("resumed from %s at step %d", ckpt.path, ckpt.step)


def gather_state(student: Student, ctx: D.DistContext, dtype: torch.dtype) -> dict[str, Any] | None:
    """The full CPU state dict in ``dtype`` on rank 0, None elsewhere. Collective."""
    state = D.full_state_dict(student.policy, ctx)
    return None if state is None else export_state_dict(state, student.causal_lm, dtype)


def save_student(
    cfg: TrainConfig,
    student: Student,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: D.DistContext,
    step: int,
    trainer_state: Callable[[], dict[str, Any]],
) -> Path | None:
    """Checkpoint ``step`` under ``cfg.run_dir``: weights in the master dtype, optimizer and
    schedule (``checkpoint.save_optimizer``), every rank's RNG, and ``trainer_state()``
    (called on rank 0). Collective; returns the directory on rank 0, None elsewhere."""
    state = gather_state(student, ctx, student.master_dtype)
    save_opt = cfg.checkpoint.save_optimizer
    optim = D.optimizer_state(student.policy, student.optimizer, ctx) if save_opt else None
    rng = D.gather_objects(capture_rng(), ctx)
    if not ctx.is_main:
        return None
    assert state is not None and rng is not None

    def write_model(directory: Path) -> None:
        write_hf_model(
            directory,
            state,
            student.causal_lm.config,
            student.tokenizer,
            serve_dtype=student.sync_dtype,
            generation_config=getattr(student.causal_lm, "generation_config", None),
        )

    return save_checkpoint(
        cfg.run_dir,
        step,
        write_model=write_model,
        trainer_state=trainer_state(),
        optimizer_state=None
        if optim is None
        else {"optimizer": optim, "scheduler": scheduler.state_dict()},
        rng_states=rng,
        keep_last=cfg.checkpoint.keep_last,
    )
