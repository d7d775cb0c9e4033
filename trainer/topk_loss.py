"""The teacher's top-k signal in the loss (``algorithm.teacher_top_k: K > 0``).

The sampled-token advantage ``c (tau - s)`` only ever talks about the token the student
sampled: a token it never samples (``\\boxed``, the end-of-turn token) gets no signal. With
``K > 0`` the teacher also returns its ``K`` most likely tokens at every response position,
and the loss adds, per position ``t``::

    top_k_coef * D_beta(P_t || Q_t)

where ``P_t`` is the teacher's distribution on ``K + 1`` buckets (its top-``K`` tokens and a
tail bucket holding the remaining mass ``1 - sum_k p_k``) and ``Q_t`` the student's on the
same buckets (its logprobs at the teacher's ``K`` ids, from the same LM-head pass as the
sampled token's logprob, and the rest as the tail). ``D_beta`` is forward KL
(``beta = 0``), reverse KL (``beta = 1``) or the generalized JSD in between
(:mod:`trainer.kernels.topk_divergence`). It is a full-distribution term, differentiated
directly (no policy-gradient estimator), aggregated over response tokens like the policy
loss (``algorithm.aggregation``), so its share of a micro-batch adds up to the batch's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from trainer.algorithms import AdditiveSums, aggregate
from trainer.config_sections import LossConfig
from trainer.kernels.topk_divergence import topk_divergence

__all__ = ["TopKSums", "finalize_topk_metrics", "topk_loss"]


@dataclasses.dataclass(frozen=True)
class TopKSums(AdditiveSums):
    """Additive sums of the top-k term over response tokens (float32 0-dim tensors)."""

    tokens: Tensor
    divergence: Tensor  # sum of D_beta(P_t || Q_t)
    teacher_tail: Tensor  # sum of the teacher's tail mass 1 - sum_k p_k

    @classmethod
    def zeros(cls, device: torch.device) -> TopKSums:
        """Sums of nothing (a rank with no real micro-batch, or ``K = 0``)."""
        return cls.from_tensor(torch.zeros(len(cls.field_names()), device=device))


def topk_loss(
    student_k_logp: Tensor,
    teacher_k_logp: Tensor,
    scatter_index: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    total_tokens: float,
    total_seqs: float,
    backend: str = "auto",
) -> tuple[Tensor, TopKSums]:
    """``top_k_coef`` times the aggregated top-k divergence of one micro-batch, and its sums.

    ``student_k_logp`` / ``teacher_k_logp`` are ``[N, K]`` over the micro-batch's response
    tokens in flat order; ``scatter_index`` places them in the ``[B, T]`` layout of ``mask``.
    """
    out = topk_divergence(
        student_k_logp,
        teacher_k_logp,
        cfg.top_k_beta,
        backend=backend,  # type: ignore[arg-type]
    )
    b, t = mask.shape
    per_token = out.divergence.new_zeros(b * t).index_copy(0, scatter_index, out.divergence)
    loss = cfg.top_k_coef * aggregate(
        per_token.view(b, t),
        mask,
        cfg.aggregation,
        total_tokens=total_tokens,
        total_seqs=total_seqs,
    )
    n = out.divergence.new_tensor(float(out.divergence.numel()))
    sums = TopKSums(n, out.divergence.detach().sum(), out.teacher_tail.detach().sum())
    return loss, sums


def finalize_topk_metrics(sums: TopKSums) -> dict[str, float]:
    """``actor/top_k_divergence`` and ``rollout/teacher_tail_mass``: per-token means."""
    n, div, tail = (float(x) for x in sums.as_tensor().double().cpu().tolist())
    return {
        "actor/top_k_divergence": div / n if n > 0 else 0.0,
        "rollout/teacher_tail_mass": tail / n if n > 0 else 0.0,
    }
