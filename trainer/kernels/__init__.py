"""Fused kernels of the trainer.

Public API::

    loss, sums = opd_loss(logp, s, tau, mask, cfg, total_tokens=..., total_seqs=..., backend="auto")
    metrics = finalize_metrics([sums_mb0, sums_mb1, ...])
    logp, lse, k_logp = linear_logprob(hidden, lm_head_weight, targets, T, k_ids=..., backend="auto")

``opd_loss`` runs the fused Triton kernel (``opd_loss_triton``) on CUDA and the plain-torch
reference (:mod:`trainer.algorithms`, the specification) elsewhere; ``OPD_LOSS_BACKEND`` or the
``backend`` argument forces either. ``linear_logprob`` (the fused LM-head + log-softmax,
``linear_logprob_triton``) dispatches the same way, with ``OPD_LOGPROB_BACKEND``; its torch path
is the chunked reference. Importing this package does not import triton.
"""

from trainer.algorithms import LossConfig, LossSums, finalize_metrics
from trainer.kernels.linear_logprob import (
    LOGPROB_BACKEND_ENV,
    ChunkedLinearLogprob,
    LinearLogprob,
    LinearLogprobFunction,
    linear_logprob,
    resolve_logprob_backend,
)
from trainer.kernels.opd_loss import (
    BACKEND_ENV,
    Backend,
    OPDLossFunction,
    opd_loss,
    resolve_backend,
    row_weights,
    triton_available,
)
from trainer.kernels.topk_divergence import TopKDivergence, topk_divergence  # noqa: F401

__all__ = [
    "BACKEND_ENV",
    "LOGPROB_BACKEND_ENV",
    "Backend",
    "ChunkedLinearLogprob",
    "LinearLogprob",
    "LinearLogprobFunction",
    "LossConfig",
    "LossSums",
    "OPDLossFunction",
    "finalize_metrics",
    "linear_logprob",
    "opd_loss",
    "resolve_backend",
    "resolve_logprob_backend",
    "row_weights",
    "triton_available",
]
