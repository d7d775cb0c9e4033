"""One optimizer step: AdamW, its learning-rate schedule, and the two halves of an update.

:func:`accumulate_gradients` runs forward/backward over a batch's token-budget micro-batches
on every rank (the accumulated gradient is the full-batch one); :func:`apply_gradients`
clips the global norm and steps AdamW and the schedule, or skips a useless update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from trainer import distributed as D
from trainer.algorithms import LossConfig, LossSums, finalize_metrics
from trainer.config import TrainerConfig
from trainer.policy import (
    PolicyModel,
    TrainSequence,
    collate,
    empty_micro_batch,
    forward_backward,
    plan_micro_batches,
)
from trainer.topk_loss import TopKSums, finalize_topk_metrics

__all__ = [
    "accumulate_gradients",
    "apply_gradients",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
]

log = logging.getLogger("opd.trainer")


def make_optimizer(params: Iterable[torch.nn.Parameter], t: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with ``trainer.lr``/``betas``/``eps``/``weight_decay``."""
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)


def lr_factor(t: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of ``trainer.lr`` after ``done`` optimizer steps.

    Warm-up is linear from ``1/warmup_steps`` (the first step already learns) to 1; then
    ``constant`` stays at 1, ``linear`` and ``cosine`` decay to 0 at ``total_steps``.
    """

    def factor(done: int) -> float:
        if done < t.warmup_steps:
            return (done + 1) / t.warmup_steps
        progress = min(1.0, (done - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        if t.lr_schedule == "linear":
            return 1.0 - progress
        if t.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``trainer.lr_schedule`` (with ``warmup_steps``) over ``total_steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, total_steps))


def accumulate_gradients(
    policy: PolicyModel,
    sequences: Sequence[TrainSequence],
    loss: LossConfig,
    ctx: D.DistContext,
    device: torch.device,
    *,
    micro_batch_tokens: int,
    temperature: float,
    backend: str,
    autocast_dtype: torch.dtype | None,
) -> tuple[LossSums, dict[str, float]]:
    """Zero the gradients, then forward/backward this rank's share of ``sequences``.

    Returns the loss sums all-reduced over ranks and the ``actor/*``, ``advantages/*``,
    ``rollout/kl*``, ``train/*`` metrics.
    """
    total_tokens = sum(len(s.response_ids) for s in sequences)
    plan = plan_micro_batches([s.length for s in sequences], micro_batch_tokens)
    # Under FSDP every rank must run the same number of forward/backward passes.
    per_rank = math.ceil(len(plan) / ctx.world_size)
    mine = plan[ctx.rank :: ctx.world_size]
    micro_batches = [collate([sequences[i] for i in idx], device) for idx in mine]
    micro_batches += [empty_micro_batch(device)] * (per_rank - len(mine))

    policy.zero_grad(set_to_none=True)
    sums = forward_backward(
        policy,
        micro_batches,
        loss,
        temperature=temperature,
        total_tokens=float(total_tokens),
        total_seqs=float(len(sequences)),
        loss_scale=float(ctx.world_size),  # FSDP averages gradients over ranks; we want sums
        backend=backend,
        autocast_dtype=autocast_dtype,
    )
    n_loss = len(LossSums.field_names())
    if sums is None:
        vec = torch.zeros(n_loss + len(TopKSums.field_names()))
    else:
        vec = torch.cat((sums[0].as_tensor(), sums[1].as_tensor().to(sums[0].tokens.device)))
    # One all-reduce for both sets of sums.
    vec = D.all_reduce_sum(vec.to(device), ctx)
    loss_sums, topk_sums = LossSums.from_tensor(vec[:n_loss]), TopKSums.from_tensor(vec[n_loss:])
    metrics = finalize_metrics(loss_sums) | {
        "train/micro_batches": float(len(plan)),
        "train/tokens": float(total_tokens),
        "train/sequences": float(len(sequences)),
        "train/policy_loss_sequences": float(sum(s.policy_loss for s in sequences)),
    }
    if loss.teacher_top_k:
        metrics |= finalize_topk_metrics(topk_sums)
    return loss_sums, metrics


def apply_gradients(
    policy: PolicyModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    grad_clip: float | None,
    tokens: int,
    step: int,
) -> dict[str, float]:
    """Clip the global gradient norm, then step AdamW and the schedule.

    With no tokens to learn from, or a non-finite gradient norm, the update is skipped rather
    than poison the weights; the step still counts (the data order is fixed). Returns
    ``actor/grad_norm`` (before clipping) and ``actor/lr`` (the rate this step used).
    """
    lr = scheduler.get_last_lr()[0]
    max_norm = grad_clip if grad_clip is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if tokens > 0 and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    else:
        log.warning(
            "step %d: skipped the optimizer update (tokens=%d, grad_norm=%s)",
            step,
            tokens,
            grad_norm,
        )
    return {"actor/grad_norm": grad_norm, "actor/lr": lr}
