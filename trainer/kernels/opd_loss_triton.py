"""The fused OPD loss forward kernel (Triton) and its host-side launcher.

One pass over memory: every program loads a block of the flattened ``[B, T]`` inputs
(``logp``, ``s``, ``tau``, ``mask`` plus the per-row aggregation weight), computes the
advantage, the per-token loss and ``d loss / d logp`` (already multiplied by the aggregation
weight), stores the gradient, and writes one row of per-program partial sums. The partials are
reduced afterwards in float64 by torch: deterministic (no atomics, so run-to-run bit-identical)
and tiny (``NUM_STATS`` floats per ``BLOCK`` tokens).

The kernel mirrors :mod:`trainer.algorithms` expression by expression (same operation order,
same tie-breaking, same clamp-gradient convention) so that it matches the reference to float32
rounding; change both together.

``TRITON_INTERPRET=1`` runs the kernel on CPU tensors through Triton's interpreter. Triton reads
that variable when a function is decorated with ``triton.jit`` -- including its own library
functions such as ``tl.sum``, decorated when ``triton`` is first imported -- so it must be set
before ``triton`` is imported at all (``tests/test_kernel.py`` does that).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Order of the per-program partial sums (row of the ``partials`` buffer).
STATS = (
    "loss",  # sum w L  (the aggregated loss share)
    "pg_loss",
    "pg_clipfrac",
    "pg_clipfrac_lower",
    "ppo_kl",
    "kl",
    "jsd",
    "adv",
    "adv_sq",
)
NUM_STATS = len(STATS)
DEFAULT_BLOCK = 1024

#: ``JSD_MODE`` constexpr values: the two special cases of ``j_t`` and the general formula.
JSD_B0, JSD_B1, JSD_GENERAL = 0, 1, 2


@triton.jit
def _opd_loss_fwd_kernel(
    logp_ptr,
    s_ptr,
    tau_ptr,
    mask_ptr,
    row_w_ptr,
    grad_ptr,
    partials_ptr,
    n_elements,
    T,
    kl_coef,
    log_b,
    log_1mb,
    clip_low,
    clip_high,
    dual_clip,
    ALGO_JSD: tl.constexpr,
    JSD_MODE: tl.constexpr,
    PPO: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    NUM_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb

    # Zero masked-out positions before any arithmetic (as the reference does) so padding
    # garbage (nan/inf) cannot leak into the loss, the gradient or the sums.
    logp = tl.where(m, tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    s = tl.where(m, tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    tau = tl.where(m, tl.load(tau_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    # Per-row aggregation weight (1/N_tok, 1/(n_b N_seq) or 1/N_seq): B floats, stay in cache.
    w = tl.where(m, tl.load(row_w_ptr + offs // T, mask=inb, other=0.0), 0.0)

    # j_t: needed for the jsd advantage and, for both algorithms, for the jsd metric.
    if JSD_MODE == 0:
        j = s - tau
    elif JSD_MODE == 1:
        j = tau - s
    else:
        x1 = s + log_1mb
        x2 = tau + log_b
        hi = tl.maximum(x1, x2)
        z = tl.exp(tl.minimum(x1, x2) - hi)  # in (0, 1]
        # log1p(z) without a libdevice call: log(u) * z / (u - 1) with u = 1 + z is accurate to
        # a few ulp (Goldberg's trick); z tiny enough that u == 1 means log1p(z) == z.
        u = 1.0 + z
        u_m1 = u - 1.0
        # (the inner where only keeps the unselected lane free of 0/0)
        log1p_z = tl.where(u_m1 == 0.0, z, tl.log(u) * (z / tl.where(u_m1 == 0.0, 1.0, u_m1)))
        log_m = hi + log1p_z
        # s - log M, not the usual b (tau - log M) + (1-b) (s - log M): see
        # trainer.algorithms (the exact policy gradient of the generalized JSD).
        j = s - log_m
    j = tl.where(m, j, 0.0)

    adv = -kl_coef * j if ALGO_JSD else kl_coef * (tau - s)
    adv = tl.where(m, adv, 0.0)
    neg_adv = -adv

    d = logp - s
    ratio = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
    # torch.clamp passes the gradient where lo <= x <= hi (inclusive) and 0 elsewhere.
    d_ok = (d >= -20.0) & (d <= 20.0)
    # Same product order as autograd of the reference: ((w * -A) * r).
    g_unclipped = tl.where(d_ok, (w * neg_adv) * ratio, 0.0)
    pg1 = neg_adv * ratio
    if PPO:
        ratio_c = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        pg2 = neg_adv * ratio_c
        clipped = pg2 > pg1  # ties keep the unclipped branch, as torch.where in the reference
        loss = tl.where(clipped, pg2, pg1)
        g_clipped = tl.where((ratio >= clip_low) & (ratio <= clip_high), g_unclipped, 0.0)
        g = tl.where(clipped, g_clipped, g_unclipped)
        pg3 = neg_adv * dual_clip
        dual = (adv < 0.0) & (loss > pg3)
        loss = tl.where(dual, pg3, loss)
        g = tl.where(dual, 0.0, g)
        clipped_n = tl.where(clipped & m, 1.0, 0.0)
        dual_n = tl.where(dual & m, 1.0, 0.0)
    else:
        loss = pg1
        g = g_unclipped
        clipped_n = tl.zeros([BLOCK], dtype=tl.float32)
        dual_n = tl.zeros([BLOCK], dtype=tl.float32)
    loss = tl.where(m, loss, 0.0)

    if WRITE_GRAD:
        g = tl.where(m, g, 0.0)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)

    row = partials_ptr + pid * NUM_STATS
    tl.store(row + 0, tl.sum(w * loss, axis=0))
    tl.store(row + 1, tl.sum(loss, axis=0))
    tl.store(row + 2, tl.sum(clipped_n, axis=0))
    tl.store(row + 3, tl.sum(dual_n, axis=0))
    tl.store(row + 4, tl.sum(tl.where(m, s - logp, 0.0), axis=0))
    tl.store(row + 5, tl.sum(tl.where(m, s - tau, 0.0), axis=0))
    tl.store(row + 6, tl.sum(j, axis=0))
    tl.store(row + 7, tl.sum(adv, axis=0))
    tl.store(row + 8, tl.sum(adv * adv, axis=0))


def interpreted() -> bool:
    """Whether this module's kernel was built for Triton's CPU interpreter.

    True only when ``TRITON_INTERPRET=1`` was set before ``triton`` was imported.
    """
    return type(_opd_loss_fwd_kernel).__name__ == "InterpretedFunction"


def launch_opd_loss_fwd(
    logp: Tensor,
    s: Tensor,
    tau: Tensor,
    mask: Tensor,
    row_weight: Tensor,
    *,
    algorithm: str,
    kl_coef: float,
    lambda_coef: float,
    ppo: bool,
    clip_eps: float,
    dual_clip: float,
    write_grad: bool,
    block_size: int = DEFAULT_BLOCK,
) -> tuple[Tensor, Tensor | None]:
    """Run the fused kernel once.

    ``logp``, ``s``, ``tau``: ``[B, T]`` floating (any of fp32/bf16/fp16); ``mask``: ``[B, T]``
    bool/integer/float (nonzero = response token); ``row_weight``: ``[B]`` float32 aggregation
    weight per row. Returns ``(sums, grad)``: ``sums`` a float32 vector ordered as
    :data:`STATS`, ``grad`` ``d loss / d logp`` in ``logp``'s dtype (``None`` unless
    ``write_grad``).
    """
    if logp.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            "the Triton OPD loss kernel needs CUDA tensors, or, for CPU tensors, TRITON_INTERPRET=1 "
            f"set before triton is imported (got {logp.device}); use backend='torch' instead"
        )
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    B, T = logp.shape
    n = B * T
    logp_c, s_c, tau_c = logp.contiguous(), s.contiguous(), tau.contiguous()
    mask_c = mask.contiguous()
    if mask_c.dtype == torch.bool:
        # Triton loads bool pointers as int1; the same bytes viewed as uint8 load portably.
        mask_c = mask_c.view(torch.uint8)
    row_w = row_weight.to(device=logp.device, dtype=torch.float32).contiguous()

    n_programs = max(triton.cdiv(n, block_size), 1)
    partials = torch.zeros((n_programs, NUM_STATS), dtype=torch.float32, device=logp.device)
    grad = torch.empty_like(logp_c) if write_grad else None
    if n > 0:
        b = float(lambda_coef)
        mode = JSD_B0 if b == 0.0 else JSD_B1 if b == 1.0 else JSD_GENERAL
        # Logs are taken on the host in float64 and rounded once to the fp32 kernel argument,
        # as torch does when it adds the Python float math.log(b) to a float32 tensor.
        log_b = math.log(b) if mode == JSD_GENERAL else 0.0
        log_1mb = math.log(1.0 - b) if mode == JSD_GENERAL else 0.0
        _opd_loss_fwd_kernel[(n_programs,)](
            logp_c,
            s_c,
            tau_c,
            mask_c,
            row_w,
            grad if grad is not None else logp_c,  # never written when WRITE_GRAD is False
            partials,
            n,
            max(T, 1),
            float(kl_coef),
            log_b,
            log_1mb,
            1.0 - float(clip_eps),
            1.0 + float(clip_eps),
            float(dual_clip),
            ALGO_JSD=algorithm == "jsd",
            JSD_MODE=mode,
            PPO=ppo,
            WRITE_GRAD=write_grad,
            NUM_STATS=NUM_STATS,
            BLOCK=block_size,
            num_warps=4 if block_size <= 1024 else 8,
            # No FMA contraction: keep the rounding of the reference's separate torch ops.
            enable_fp_fusion=False,
        )
    sums = partials.sum(0, dtype=torch.float64).to(torch.float32)
    return sums, grad
