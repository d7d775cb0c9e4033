"""Fused kernels of the trainer.

Public API::

    loss, sums = opd_loss(logp, s, tau, mask, cfg, total_tokens=..., total_seqs=..., backend="auto")
    metrics = finalize_metrics([sums_mb0, sums_mb1, ...])

``opd_loss`` runs the fused Triton kernel (``opd_loss_triton``) on CUDA and the plain-torch
reference (:mod:`trainer.algorithms`, the specification) elsewhere; ``OPD_LOSS_BACKEND`` or the
``backend`` argument forces either. Importing this package does not import triton.
"""

from trainer.algorithms import LossConfig, LossSums, finalize_metrics
from trainer.kernels.opd_loss import (
    BACKEND_ENV,
    Backend,
    OPDLossFunction,
    opd_loss,
    resolve_backend,
    row_weights,
    triton_available,
)

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "LossConfig",
    "LossSums",
    "OPDLossFunction",
    "finalize_metrics",
    "opd_loss",
    "resolve_backend",
    "row_weights",
    "triton_available",
]
