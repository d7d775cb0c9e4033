"""The fused top-``K`` divergence kernel (Triton) and its host-side launcher.

For student logprobs ``s [N, K]`` and teacher logprobs ``t [N, K]`` at the teacher's top-``K``
ids, one program per ``BLOCK_N`` rows loads a ``[BLOCK_N, BLOCK_K]`` tile of each (``K`` padded
to the power of two ``BLOCK_K``, padding masked), forms the ``K + 1`` buckets (the ``K`` masses
and the clamped tail), and writes per row the divergence ``D_beta(P || Q)``, the teacher tail
mass and, when asked, the ``[N, K]`` factor ``d D / d s``. The math, the tail clamp and the
gradient convention are those of :mod:`trainer.kernels.topk_divergence` (whose torch reference is
the specification); all arithmetic is float32 whatever the input dtypes.

One forward kernel, no backward kernel: the forward has every quantity the gradient needs
(``q``, the tails and their logs, ``log M``) in registers, so writing ``d D / d s`` costs one
extra ``[N, K]`` float32 store, and the backward is a single ``grad_out[:, None] * factor`` in
torch (one read). A separate backward kernel would re-read both inputs and redo every ``exp``
and ``log`` to save ``4 N K`` bytes between forward and backward -- small next to the
activations they sit beside (``K <= 64`` in the trainer's config).

Every program owns the rows it writes: no atomics, run-to-run bit-identical.

``TRITON_INTERPRET=1`` runs the kernel on CPU tensors through Triton's interpreter; it must be
set before ``triton`` is imported and before this module is imported (``tests/conftest.py`` and
``tests/test_topk_divergence.py`` do that for the tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

#: ``MODE`` constexpr values: the two KL special cases (beta = 0, 1) and the general formula.
MODE_FORWARD_KL, MODE_REVERSE_KL, MODE_JSD = 0, 1, 2
#: Largest ``K`` the kernel takes: the whole ``[BLOCK_N, BLOCK_K]`` row tile lives in registers.
MAX_K = 4096
#: Elements of the default tile: ``BLOCK_N = clamp(TILE // BLOCK_K, 1, 128)`` rows a program.
#: Untuned (no GPU has run this kernel); the kernel is memory-bound, so any tile that keeps the
#: SMs busy without spilling will do.
TILE = 2048
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _logaddexp(a, b):
    """``log(exp a + exp b)``, stable; ``a`` or ``b`` may be ``-inf`` (not both)."""
    hi = tl.maximum(a, b)
    z = tl.exp(tl.minimum(a, b) - hi)  # in [0, 1]
    # log1p(z) without a libdevice call: log(u) * z / (u - 1) with u = 1 + z (Goldberg's
    # trick, as in opd_loss_triton); z so small that u == 1 means log1p(z) == z.
    u = 1.0 + z
    u_m1 = u - 1.0
    return hi + tl.where(u_m1 == 0.0, z, tl.log(u) * (z / tl.where(u_m1 == 0.0, 1.0, u_m1)))


@triton.jit
def _topk_divergence_fwd_kernel(
    s_ptr,
    t_ptr,
    div_ptr,
    tail_ptr,
    grad_ptr,
    N,
    K,
    beta,
    log_b,
    log_1mb,
    eps,
    MODE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    # Padding lanes load 0 (finite, so no inf/nan arithmetic) and are zeroed out of every sum.
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    q = tl.where(ok, tl.exp(s), 0.0)
    p = tl.where(ok, tl.exp(t), 0.0)
    # Teacher buckets of zero mass (t = -inf) contribute 0 (0 log 0 = 0), as in the reference;
    # t_p (t there, 0 elsewhere) keeps the unselected P-weighted lanes free of 0 * -inf.
    p_pos = ok & (p > 0.0)
    t_p = tl.where(p_pos, t, 0.0)

    q_rest = 1.0 - tl.sum(q, axis=1)
    p_rest = 1.0 - tl.sum(p, axis=1)
    # torch.clamp(min=eps) passes the gradient where x >= eps: the tail is "free" there.
    q_free = q_rest >= eps
    q_tail = tl.maximum(q_rest, eps)
    p_tail = tl.maximum(p_rest, eps)
    lq = tl.log(q_tail)
    lp = tl.log(p_tail)

    # g = d D / d s_k = w_k - [free] q_k w_tail / q_tail with w_j = d D / d log Q_j (module
    # docstring of topk_divergence), written out per mode in its cancelled form.
    if MODE == 0:
        # KL(P || Q) = sum P (log P - log Q)
        div = tl.sum(tl.where(p_pos, p * (t_p - s), 0.0), axis=1) + p_tail * (lp - lq)
        g = -p + tl.where(q_free, p_tail / q_tail, 0.0)[:, None] * q
    elif MODE == 1:
        # KL(Q || P) = sum Q (log Q - log P)
        div = tl.sum(tl.where(ok, q * (s - t), 0.0), axis=1) + q_tail * (lq - lp)
        g = q * ((s - t) - tl.where(q_free, lq - lp, -1.0)[:, None])
    else:
        # beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
        lm = _logaddexp(t + log_b, s + log_1mb)
        lm_tail = _logaddexp(lp + log_b, lq + log_1mb)
        kl_pm = tl.sum(tl.where(p_pos, p * (t_p - lm), 0.0), axis=1) + p_tail * (lp - lm_tail)
        kl_qm = tl.sum(tl.where(ok, q * (s - lm), 0.0), axis=1) + q_tail * (lq - lm_tail)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
        g = (1.0 - beta) * q * ((s - lm) - tl.where(q_free, lq - lm_tail, 0.0)[:, None])

    tl.store(div_ptr + rows, div, mask=row_ok)
    tl.store(tail_ptr + rows, p_tail, mask=row_ok)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, g, mask=ok)


def interpreted() -> bool:
    """Whether this module's kernel was built for Triton's CPU interpreter.

    True only when ``TRITON_INTERPRET=1`` was set before ``triton`` and this module were
    imported.
    """
    return type(_topk_divergence_fwd_kernel).__name__ == "InterpretedFunction"


def default_block_n(k: int) -> int:
    """Rows per program for ``K = k``: ``TILE // BLOCK_K`` clamped to ``[1, 128]``."""
    return max(1, min(128, TILE // triton.next_power_of_2(max(k, 1))))


def launch_fwd(
    student_logp: Tensor,
    teacher_logp: Tensor,
    beta: float,
    eps: float,
    *,
    write_grad: bool,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the kernel once: ``(divergence [N], teacher_tail [N], grad [N, K] or None)``.

    ``student_logp`` and ``teacher_logp`` are ``[N, K]`` (fp32/bf16/fp16, the two may differ;
    validated by the caller), ``eps`` the tail clamp. All outputs are float32; ``grad`` is
    ``d divergence_i / d student_logp[i, k]`` (``None`` unless ``write_grad``).
    """
    s, t = student_logp.contiguous(), teacher_logp.contiguous()
    if s.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            "the Triton top-k divergence kernel needs CUDA tensors, or, for CPU tensors, "
            "TRITON_INTERPRET=1 set before triton is imported (got "
            f"{s.device}); use backend='torch' instead"
        )
    for name, x in (("student_logp", s), ("teacher_logp", t)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    n, k = s.shape
    if k > MAX_K:
        raise ValueError(f"the Triton top-k divergence kernel takes K <= {MAX_K}, got K={k}")
    block_n = block_n or default_block_n(k)
    if block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    block_k = triton.next_power_of_2(k)
    dev = s.device
    div = torch.empty(n, dtype=torch.float32, device=dev)
    tail = torch.empty(n, dtype=torch.float32, device=dev)
    grad = torch.empty((n, k), dtype=torch.float32, device=dev) if write_grad else None
    if n > 0:
        b = float(beta)
        mode = MODE_FORWARD_KL if b == 0.0 else MODE_REVERSE_KL if b == 1.0 else MODE_JSD
        # Logs taken on the host in float64 and rounded once to the fp32 kernel argument, as
        # torch does when the reference adds the Python float math.log(b) to a float32 tensor.
        log_b = math.log(b) if mode == MODE_JSD else 0.0
        log_1mb = math.log(1.0 - b) if mode == MODE_JSD else 0.0
        _topk_divergence_fwd_kernel[(triton.cdiv(n, block_n),)](
            s, t, div, tail, grad if grad is not None else div,  # grad unused without WRITE_GRAD
            n, k, b, log_b, log_1mb, float(eps),
            MODE=mode, WRITE_GRAD=write_grad, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4 if block_n * block_k <= TILE else 8,
        )  # fmt: skip
    return div, tail, grad
