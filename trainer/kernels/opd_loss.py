"""Autograd wrapper and backend dispatch for the fused OPD loss.

``opd_loss`` computes the same ``(loss, sums)`` as :func:`trainer.algorithms.reference_loss`,
either through the reference itself (``torch`` backend) or through one launch of the fused
Triton kernel (``triton`` backend). With the kernel, the forward already produces
``d loss / d logp`` (scaled by the aggregation weight), so the backward is a single
``grad_output * saved_grad``; no autograd graph of the elementwise composite is kept.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

import torch
from torch import Tensor

from trainer.algorithms import (
    LossConfig,
    LossSums,
    _bool_mask,
    _check_shapes,
    _denominator,
    _safe,
    reference_loss,
)

Backend = Literal["auto", "triton", "torch"]
#: Environment variable that picks the backend when the caller passes ``backend="auto"``.
BACKEND_ENV = "OPD_LOSS_BACKEND"
_BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def choose_backend(backend: str, env_var: str, kernel_fits: bool) -> Literal["triton", "torch"]:
    """Pick ``"triton"`` or ``"torch"`` for one kernel: the rule both kernels share.

    An explicit ``"triton"`` or ``"torch"`` always wins. ``"auto"`` first defers to the
    environment variable ``env_var`` (``auto``/``triton``/``torch``), then picks Triton when
    ``kernel_fits`` (the tensors are ones the kernel handles, e.g. on CUDA) and Triton is
    importable, else the torch path.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(env_var, "").strip().lower() or "auto"
        if env not in _BACKENDS:
            raise ValueError(f"{env_var} must be one of {_BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return "triton" if kernel_fits and triton_available() else "torch"
    return backend  # type: ignore[return-value]


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """The backend that ``opd_loss(..., backend=backend)`` runs for tensors on ``device``:
    ``OPD_LOSS_BACKEND`` for ``"auto"``, then Triton on CUDA (:func:`choose_backend`)."""
    return choose_backend(backend, BACKEND_ENV, device.type == "cuda")


def row_weights(
    row_tokens: Tensor,
    aggregation: str,
    *,
    total_tokens: float | Tensor | None = None,
    total_seqs: float | Tensor | None = None,
) -> Tensor:
    """Per-row weight ``w_b`` with ``loss = sum_{b,t} w_b m L``, for the given aggregation.

    ``token-mean``: ``1/N_tok``; ``seq-mean-token-mean``: ``(1/N_seq)/n_b``;
    ``seq-mean-token-sum``: ``1/N_seq``. Computed with the same float32 operations, in the same
    order, as the gradient that autograd propagates through :func:`trainer.algorithms.aggregate`,
    so the kernel's gradient matches the reference's bit for bit up to the ``exp``.
    """
    if aggregation == "token-mean":
        n_tok = _denominator(total_tokens, row_tokens.sum())
        return (1.0 / n_tok).expand(row_tokens.shape[0])
    n_seq = _denominator(total_seqs, (row_tokens > 0).sum().to(row_tokens.dtype))
    if aggregation == "seq-mean-token-mean":
        return (1.0 / n_seq) / _safe(row_tokens)
    if aggregation == "seq-mean-token-sum":
        return (1.0 / n_seq).expand(row_tokens.shape[0])
    raise ValueError(f"unknown aggregation {aggregation!r}")


def launch_kernel(
    logp: Tensor,
    s: Tensor,
    tau: Tensor,
    mask: Tensor,
    row_w: Tensor,
    cfg: LossConfig,
    block_size: int | None = None,
    write_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """One launch of the fused kernel with ``cfg``'s scalars: ``(sums, grad)`` of
    :func:`~trainer.kernels.opd_loss_triton.launch_opd_loss_fwd` (``grad`` None unless
    ``write_grad``)."""
    # Imported here so that merely importing trainer.kernels never imports triton.
    from trainer.kernels import opd_loss_triton as k

    return k.launch_opd_loss_fwd(
        logp,
        s,
        tau,
        mask,
        row_w,
        algorithm=cfg.algorithm,
        kl_coef=cfg.kl_coef,
        lambda_coef=cfg.lambda_coef,
        ppo=cfg.loss == "ppo",
        clip_eps=cfg.clip_eps,
        dual_clip=cfg.dual_clip,
        write_grad=write_grad,
        block_size=block_size or k.DEFAULT_BLOCK,
    )


class OPDLossFunction(torch.autograd.Function):
    """Fused forward (loss, metric sums and saved gradient); backward = ``grad_out * grad``.

    Outputs ``(loss, stats)``: ``loss`` a float32 0-dim tensor, ``stats`` the non-differentiable
    float32 vector of the kernel's remaining sums (order of ``opd_loss_triton.STATS[1:]``).
    """

    # Repeats launch_kernel's parameters on purpose: autograd tracks only what apply() is given
    # positionally, so forward must spell out each input rather than take a bundle.
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logp: Tensor,
        s: Tensor,
        tau: Tensor,
        mask: Tensor,
        row_w: Tensor,
        cfg: LossConfig,
        block_size: int | None,
    ) -> tuple[Tensor, Tensor]:
        sums, grad = launch_kernel(logp, s, tau, mask, row_w, cfg, block_size, write_grad=True)
        ctx.save_for_backward(grad)
        loss, stats = sums[0].clone(), sums[1:].clone()
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _grad_stats: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # grad is in logp's dtype; a 0-dim float32 grad_loss does not promote it.
        return grad * grad_loss, None, None, None, None, None, None


# Takes reference_loss's arguments on purpose (plus the backend's): a drop-in replacement.
def opd_loss(
    logp: Tensor,
    s: Tensor,
    tau: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    total_tokens: float | Tensor | None = None,
    total_seqs: float | Tensor | None = None,
    backend: Backend = "auto",
    block_size: int | None = None,
) -> tuple[Tensor, LossSums]:
    """The OPD policy loss of docs/design.md §4 and its metric sums, on the chosen backend.

    Args:
        logp: ``[B, T]`` logprob of each sampled token under the trained policy (requires grad;
            fp32, bf16 or fp16 -- math is float32, the gradient comes back in ``logp.dtype``).
        s: ``[B, T]`` behaviour (rollout) logprobs. No gradient.
        tau: ``[B, T]`` teacher logprobs. No gradient.
        mask: ``[B, T]`` response mask (bool, or numbers with nonzero = response token).
        cfg: the loss scalars.
        total_tokens: response tokens of the whole batch when this call is one micro-batch
            (``None``: this call is the whole batch).
        total_seqs: sequences with at least one response token in the whole batch (``None``:
            this call is the whole batch). Micro-batches must hold whole sequences.
        backend: ``"auto"`` (env ``OPD_LOSS_BACKEND``, then Triton on CUDA, else torch),
            ``"triton"`` (the fused kernel; CPU tensors need ``TRITON_INTERPRET=1``) or
            ``"torch"`` (the reference).
        block_size: tokens per Triton program (power of two); ``None`` for the default.

    Returns:
        ``(loss, sums)``: ``loss`` is this call's share of the aggregated loss (0-dim float32;
        summing the shares of all micro-batches gives the full-batch loss) and ``sums`` the
        additive :class:`~trainer.algorithms.LossSums` for :func:`finalize_metrics`.
    """
    if resolve_backend(backend, logp.device) == "torch":
        loss, sums = reference_loss(
            logp, s, tau, mask, cfg, total_tokens=total_tokens, total_seqs=total_seqs
        )
        return loss, LossSums(**sums)

    _check_shapes(logp, s, tau, mask)
    # A tiny extra read of the mask (B outputs) gives the per-row weights the kernel needs; the
    # big inputs are read once, by the kernel.
    row_tokens = _bool_mask(mask).sum(-1, dtype=torch.float32)
    row_w = row_weights(
        row_tokens, cfg.aggregation, total_tokens=total_tokens, total_seqs=total_seqs
    )
    s, tau = s.detach(), tau.detach()
    if logp.requires_grad and torch.is_grad_enabled():
        loss, stats = OPDLossFunction.apply(logp, s, tau, mask, row_w, cfg, block_size)
    else:
        sums_vec, _ = launch_kernel(logp, s, tau, mask, row_w, cfg, block_size, write_grad=False)
        loss, stats = sums_vec[0], sums_vec[1:]
    # The kernel's stats are LossSums' fields after the two counts, in order (STATS[1:]);
    # tests/test_kernel.py compares every field with the reference, so a reorder fails there.
    counts = torch.stack((row_tokens.sum(), (row_tokens > 0).sum().to(torch.float32)))
    return loss, LossSums.from_tensor(torch.cat((counts, stats)))
