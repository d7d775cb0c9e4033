"""The fused LM-head + log-softmax kernels (Triton) and their host-side launchers.

For final hidden states ``h [N, H]``, the LM-head weight ``W [V, H]`` (optional bias ``b [V]``)
and a temperature ``T``, with ``z = (h W^T + b) / T``, the forward computes per row the
logsumexp ``lse = log sum_v exp z_v``, the sampled token's logprob ``z_y - lse`` and, for ``K``
extra ids per row (the teacher's top-k), ``z_k - lse``, without ever holding ``[N, V]`` logits:

* forward, one program per ``BLOCK_N`` rows: loop over ``V`` in ``BLOCK_V`` columns; each
  ``[BLOCK_N, BLOCK_V]`` logits tile is ``tl.dot`` over ``H`` in ``BLOCK_H`` slices (float32
  accumulator), folded into a running max / running sum (online logsumexp); the sampled logit is
  picked out of the tile it falls in. The ``K`` extra logits are then row-wise dot products
  ``h_n . W[k]`` (``K * H`` loads per row, not ``V``).
* backward, two deterministic kernels (no atomics; every program owns the rows it writes):
  ``_grad_h_kernel`` (one program per ``BLOCK_N`` rows) recomputes each logits tile, forms
  ``d/dlogits = (gy onehot(y) + sum_k gk onehot(k) - c softmax) / T`` with
  ``c = gy + sum_k gk - g_lse`` and adds ``d/dlogits @ W`` into its rows of a float32 ``grad_h``;
  ``_grad_w_kernel`` (one program per ``BLOCK_V`` vocabulary rows) recomputes the same tiles
  for its columns over all ``N`` and adds ``d/dlogits^T @ h`` into its rows of a float32
  ``grad_W`` (and the column sums into ``grad_b``). The price of determinism is one extra
  recomputation of the logits: forward + backward execute ``10 N V H`` flops instead of the
  ``8 N V H`` of a single backward kernel with atomics.

Inputs may be float32, bfloat16 or float16 (``h`` and ``W`` may differ); every tile is cast to
the compute dtype before ``tl.dot`` (float32 runs ``input_precision="ieee"``, no TF32), and
logits, softmax, logsumexp and the gradient accumulators are float32.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors through Triton's interpreter; it must be
set before ``triton`` is imported (``tests/conftest.py`` does that for the tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


class Blocks(NamedTuple):
    """Tile sizes (powers of two, each >= 16 for ``tl.dot``) and warps per program.

    The default is untuned (no GPU has run these kernels): it is the largest of the few shapes
    tried whose bf16 kernels compile ahead of time for sm_90 (Triton 3.9, ptxas) with little or
    no register spilling (``BLOCK_H = 64`` spills hundreds of bytes a thread in all three).
    """

    n: int = 64
    v: int = 128
    h: int = 32
    num_warps: int = 8


DEFAULT_BLOCKS = Blocks()
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _dot(a, b, acc, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with both operands rounded to ``COMPUTE``, float32 accumulation.

    ``UPCAST`` (set only under Triton's interpreter, for bfloat16) multiplies the rounded
    operands as float32: the interpreter's ``tl.dot`` multiplies the raw uint16 bit patterns it
    stores bfloat16 in. bf16 -> fp32 is exact, so the result is the bf16 dot's up to order.
    """
    a = a.to(COMPUTE)
    b = b.to(COMPUTE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    H,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` float32 ``(h W^T + b) / T``; ``-inf`` in columns past ``V``."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hc = h0 + tl.arange(0, BLOCK_H)
        h_ok = hc < H
        a = tl.load(
            h_ptr + rows[:, None] * H + hc[None, :],
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        # W^T slice [BLOCK_H, BLOCK_V], loaded transposed
        wt = tl.load(
            w_ptr + cols[None, :] * H + hc[:, None],
            mask=col_ok[None, :] & h_ok[:, None],
            other=0.0,
        )
        acc = _dot(a, wt, acc, COMPUTE, PRECISION, UPCAST)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(COMPUTE).to(tl.float32)
        acc += bias[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _dlogits_tile(
    z,
    lse,
    y,
    gy,
    coef,
    kid_ptr,
    gk_ptr,
    rows,
    cols,
    row_ok,
    K,
    inv_temp,
):
    """``d loss / d (h W^T + b)`` of a tile: ``(gy 1[v=y] + sum_k gk 1[v=k] - c p_v) / T``."""
    p = tl.exp(z - lse[:, None])  # 0 in columns past V (z = -inf)
    dz = -coef[:, None] * p + tl.where(cols[None, :] == y[:, None], gy[:, None], 0.0)
    for k in range(0, K):
        ids = tl.load(kid_ptr + rows * K + k, mask=row_ok, other=-1)
        gk = tl.load(gk_ptr + rows * K + k, mask=row_ok, other=0.0)
        dz += tl.where(cols[None, :] == ids[:, None], gk[:, None], 0.0)
    return tl.where(row_ok[:, None], dz * inv_temp, 0.0)


@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    kid_ptr,
    lse_ptr,
    logp_ptr,
    klogp_ptr,
    N,
    V,
    H,
    K,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, inv_temp,
            HAS_BIAS, COMPUTE, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, z_y - lse, mask=row_ok)

    # The K extra logits: row-wise dots h_n . W[k_n], with the tile path's rounding of the
    # inputs (cast to the compute dtype; the products of two such values are exact in fp32).
    for k in range(0, K):
        ids = tl.load(kid_ptr + rows * K + k, mask=row_ok, other=0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            msk = row_ok[:, None] & (hc < H)[None, :]
            a = tl.load(h_ptr + rows[:, None] * H + hc[None, :], mask=msk, other=0.0)
            w = tl.load(w_ptr + ids[:, None] * H + hc[None, :], mask=msk, other=0.0)
            a32 = a.to(COMPUTE).to(tl.float32)
            w32 = w.to(COMPUTE).to(tl.float32)
            acc += tl.sum(a32 * w32, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ids, mask=row_ok, other=0.0).to(COMPUTE).to(tl.float32)
        tl.store(klogp_ptr + rows * K + k, acc * inv_temp - lse, mask=row_ok)


@triton.jit
def _grad_h_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    kid_ptr,
    lse_ptr,
    gy_ptr,
    coef_ptr,
    gk_ptr,
    grad_h_ptr,
    N,
    V,
    H,
    K,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gy = tl.load(gy_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, inv_temp,
            HAS_BIAS, COMPUTE, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        dz = _dlogits_tile(z, lse, y, gy, coef, kid_ptr, gk_ptr, rows, cols, row_ok, K, inv_temp)
        dz = dz.to(COMPUTE)
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            w = tl.load(
                w_ptr + cols[:, None] * H + hc[None, :],
                mask=col_ok[:, None] & h_ok[None, :],
                other=0.0,
            )
            ptrs = grad_h_ptr + rows[:, None] * H + hc[None, :]
            msk = row_ok[:, None] & h_ok[None, :]
            # this program alone owns these rows: read-modify-write, no atomics
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc = _dot(dz, w, acc, COMPUTE, PRECISION, UPCAST)
            tl.store(ptrs, acc, mask=msk)


# Mirrors _grad_h_kernel on purpose: the same tile recomputation, reduced over rows instead of
# columns; one program per vocabulary block owns its grad_W rows, so no atomics are needed and
# the result is deterministic. Merging the two would need atomics on grad_W.
@triton.jit
def _grad_w_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    kid_ptr,
    lse_ptr,
    gy_ptr,
    coef_ptr,
    gk_ptr,
    grad_w_ptr,
    grad_b_ptr,
    N,
    V,
    H,
    K,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    WRITE_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        gy = tl.load(gy_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, inv_temp,
            HAS_BIAS, COMPUTE, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        dz = _dlogits_tile(z, lse, y, gy, coef, kid_ptr, gk_ptr, rows, cols, row_ok, K, inv_temp)
        if WRITE_BIAS:
            db += tl.sum(dz, axis=0)
        dzt = tl.trans(dz.to(COMPUTE))  # [BLOCK_V, BLOCK_N]
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            a = tl.load(
                h_ptr + rows[:, None] * H + hc[None, :],
                mask=row_ok[:, None] & h_ok[None, :],
                other=0.0,
            )
            ptrs = grad_w_ptr + cols[:, None] * H + hc[None, :]
            msk = col_ok[:, None] & h_ok[None, :]
            # this program alone owns these vocabulary rows: read-modify-write, no atomics
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc = _dot(dzt, a, acc, COMPUTE, PRECISION, UPCAST)
            tl.store(ptrs, acc, mask=msk)
    if WRITE_BIAS:
        tl.store(grad_b_ptr + cols, db, mask=col_ok)


def interpreted() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter.

    True only when ``TRITON_INTERPRET=1`` was set before ``triton`` was imported.
    """
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _check(h: Tensor, weight: Tensor, compute_dtype: torch.dtype, blocks: Blocks) -> None:
    if h.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            "the Triton linear-logprob kernel needs CUDA tensors, or, for CPU tensors, "
            "TRITON_INTERPRET=1 set before triton is imported (got "
            f"{h.device}); use backend='torch' instead"
        )
    for name, t in (("hidden", h.dtype), ("weight", weight.dtype), ("compute", compute_dtype)):
        if t not in _TL_DTYPES:
            raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {t}")
    for b in blocks[:3]:
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {blocks}")
    # Offsets are int32 (int64 pointer tiles double the kernels' register use).
    n, hd = h.shape
    if max(n, weight.shape[0] + blocks.v) * hd >= 2**31:
        raise ValueError(f"N * H and V * H must stay below 2**31 (N={n}, V={weight.shape[0]})")


def _common(compute_dtype: torch.dtype, blocks: Blocks) -> dict:
    return {
        "COMPUTE": _TL_DTYPES[compute_dtype],
        "PRECISION": "ieee",
        "UPCAST": interpreted() and compute_dtype == torch.bfloat16,
        "BLOCK_N": blocks.n,
        "BLOCK_V": blocks.v,
        "BLOCK_H": blocks.h,
        "num_warps": blocks.num_warps,
    }


def launch_fwd(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    k_ids: Tensor,
    inv_temp: float,
    compute_dtype: torch.dtype,
    blocks: Blocks = DEFAULT_BLOCKS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward kernel: ``(logp [N], lse [N], k_logp [N, K])``, all float32.

    ``h [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``targets [N]`` and ``k_ids [N, K]``
    integer ids in ``[0, V)`` (not checked: that would cost a device sync), all contiguous.
    """
    _check(h, weight, compute_dtype, blocks)
    n, hd = h.shape
    v = weight.shape[0]
    k = k_ids.shape[1]
    dev = h.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    k_logp = torch.empty((n, k), dtype=torch.float32, device=dev)
    if n > 0:
        _fwd_kernel[(triton.cdiv(n, blocks.n),)](
            h, weight, bias if bias is not None else weight, targets, k_ids,
            lse, logp, k_logp, n, v, hd, k, float(inv_temp),
            HAS_BIAS=bias is not None, **_common(compute_dtype, blocks),
        )  # fmt: skip
    return logp, lse, k_logp


def launch_bwd(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    k_ids: Tensor,
    lse: Tensor,
    g_logp: Tensor,
    coef: Tensor,
    g_k: Tensor,
    inv_temp: float,
    compute_dtype: torch.dtype,
    *,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    blocks: Blocks = DEFAULT_BLOCKS,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Run the backward kernels: float32 ``(grad_h [N, H], grad_W [V, H], grad_b [V])``.

    ``g_logp [N]``, ``coef [N] = g_logp + g_k.sum(-1) - g_lse`` and ``g_k [N, K]`` are the
    float32 upstream gradients; ``lse`` the forward's. A gradient not asked for is ``None`` and
    its kernel is not launched.
    """
    _check(h, weight, compute_dtype, blocks)
    n, hd = h.shape
    v = weight.shape[0]
    k = k_ids.shape[1]
    dev = h.device
    common = _common(compute_dtype, blocks)
    has_bias = bias is not None
    b_arg = bias if has_bias else weight
    grad_h = torch.zeros((n, hd), dtype=torch.float32, device=dev) if need_h else None
    grad_w = torch.zeros((v, hd), dtype=torch.float32, device=dev) if need_w or need_b else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=dev) if need_b and has_bias else None
    if n == 0:
        return grad_h, grad_w if need_w else None, grad_b
    args = (targets, k_ids, lse, g_logp, coef, g_k)
    if grad_h is not None:
        _grad_h_kernel[(triton.cdiv(n, blocks.n),)](
            h, weight, b_arg, *args, grad_h, n, v, hd, k, float(inv_temp),
            HAS_BIAS=has_bias, **common,
        )  # fmt: skip
    if grad_w is not None:
        _grad_w_kernel[(triton.cdiv(v, blocks.v),)](
            h, weight, b_arg, *args, grad_w, grad_b if grad_b is not None else grad_w,
            n, v, hd, k, float(inv_temp),
            HAS_BIAS=has_bias, WRITE_BIAS=grad_b is not None, **common,
        )  # fmt: skip
    return grad_h, grad_w if need_w else None, grad_b
