"""Fused LM-head + log-softmax: logprobs of chosen tokens without ``[N, V]`` logits.

For final hidden states ``h [N, H]``, the LM-head weight ``W [V, H]`` (optional bias ``[V]``),
sampled ids ``y [N]``, a temperature ``T`` and optionally extra ids ``k_ids [N, K]`` (the
teacher's top-k; ``K`` may be 0), with ``z = (h W^T + b) / T``::

    out = linear_logprob(h, W, y, T, bias=b, k_ids=k_ids, backend="auto")
    out.logp    # [N]    log_softmax(z)[y]
    out.lse     # [N]    logsumexp(z)
    out.k_logp  # [N, K] log_softmax(z)[k_ids]  (None without k_ids)

all float32 (float64 for float64 inputs on the torch path), differentiable with respect to
``h``, ``W`` and ``b`` through any of the three outputs.

Two backends compute the same thing:

* ``torch`` -- :class:`ChunkedLinearLogprob`, the reference and the CPU path (what
  ``trainer.policy.chunked_token_logprobs`` runs off CUDA): the projection in the compute
  dtype, ``chunk`` rows at a time, softmax/logsumexp in float32, logits recomputed chunk by chunk in the backward)
  extended to the logsumexp and the ``k_ids`` outputs. At most ``[chunk, V]`` logits exist.
* ``triton`` -- :class:`LinearLogprobFunction` around the kernels of
  :mod:`trainer.kernels.linear_logprob_triton`: logits exist only as ``[BLOCK_N, BLOCK_V]``
  tiles, in float32 (the torch path rounds them to the compute dtype first, as ``F.linear``
  does, so with bfloat16 the kernel is the more accurate of the two). Supports float32,
  bfloat16 and float16.

``backend="auto"`` defers to ``OPD_LOGPROB_BACKEND`` (``auto``/``triton``/``torch``), then runs
Triton for CUDA tensors of a supported dtype when Triton is importable, else the torch path.
Importing this module does not import triton.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.kernels.opd_loss import choose_backend

Backend = Literal["auto", "triton", "torch"]
#: Environment variable that picks the backend when the caller passes ``backend="auto"``.
LOGPROB_BACKEND_ENV = "OPD_LOGPROB_BACKEND"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LinearLogprob(NamedTuple):
    """Outputs of :func:`linear_logprob`."""

    logp: Tensor  # [N]
    lse: Tensor  # [N]
    k_logp: Tensor | None  # [N, K], None when no k_ids were given


def resolve_logprob_backend(
    backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()
) -> Literal["triton", "torch"]:
    """The backend that ``linear_logprob(..., backend=backend)`` runs for these tensors.

    An explicit ``"triton"`` or ``"torch"`` always wins. ``"auto"`` first defers to
    ``OPD_LOGPROB_BACKEND``, then picks Triton when the tensors are on CUDA, every dtype in
    ``dtypes`` is one the kernel supports (fp32/bf16/fp16) and Triton is importable.
    """
    fits = device.type == "cuda" and all(d in _KERNEL_DTYPES for d in dtypes)
    return choose_backend(backend, LOGPROB_BACKEND_ENV, fits)


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # float32 for fp32/bf16/fp16; float64 stays float64 (so gradcheck can verify the backward).
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _upstream(
    g_logp: Tensor | None, g_lse: Tensor | None, g_k: Tensor | None, n: int, k: int, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream gradients (zeros for unused outputs) and ``coef = g_logp + sum g_k - g_lse``,

    the weight of ``softmax`` in ``d/dz = g_logp onehot(y) + sum_k g_k onehot(k) - coef p``.
    """
    acc = like.dtype
    gy = g_logp.to(acc) if g_logp is not None else like.new_zeros(n)
    gk = g_k.to(acc) if g_k is not None else like.new_zeros((n, k))
    coef = gy + gk.sum(-1)
    if g_lse is not None:
        coef = coef - g_lse.to(acc)
    return gy.contiguous(), coef.contiguous(), gk.contiguous()


class ChunkedLinearLogprob(torch.autograd.Function):
    """The torch reference: ``chunk`` rows at a time, logits recomputed in the backward.

    Inputs ``(hidden, weight, bias, targets, k_ids, inv_temp, chunk, compute_dtype)``; outputs
    ``(logp [N], lse [N], k_logp [N, K])``. Saves only the inputs and ``lse``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        k_ids: Tensor,
        inv_temp: float,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = hidden.shape[0]
        acc = _accumulate_dtype(compute_dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        k_logp = torch.empty(k_ids.shape, dtype=acc, device=hidden.device)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            logits = F.linear(hidden[sl].to(compute_dtype), w, b).to(acc) * inv_temp
            chunk_lse = torch.logsumexp(logits, dim=-1)
            logp[sl] = logits.gather(1, targets[sl, None]).squeeze(1) - chunk_lse
            k_logp[sl] = logits.gather(1, k_ids[sl]) - chunk_lse[:, None]
            lse[sl] = chunk_lse
        ctx.save_for_backward(
            hidden, weight, bias if bias is not None else torch.empty(0), targets, k_ids, lse
        )
        ctx.has_bias = bias is not None
        ctx.inv_temp, ctx.chunk, ctx.compute_dtype = inv_temp, chunk, compute_dtype
        return logp, lse, k_logp

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_logp: Tensor | None, g_lse: Tensor | None, g_k: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, k_ids, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd, inv_temp, chunk = ctx.compute_dtype, ctx.inv_temp, ctx.chunk
        n, k = k_ids.shape
        gy, coef, gk = _upstream(g_logp, g_lse, g_k, n, k, lse)
        acc = lse.dtype
        w = weight.to(cd)
        b = bias.to(cd) if ctx.has_bias else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # Weight gradients accumulate over chunks in float32 whatever the compute dtype.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=acc, device=weight.device)
            if need_b and ctx.has_bias
            else None
        )
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            h = hidden[sl].to(cd)
            logits = F.linear(h, w, b).to(acc) * inv_temp
            # d/dlogits = gy onehot(y) + sum_k gk onehot(k) - coef softmax, then the 1/T.
            g = torch.exp(logits - lse[sl, None]).mul_(-coef[sl, None])
            g.scatter_add_(1, targets[sl, None], gy[sl, None])
            g.scatter_add_(1, k_ids[sl], gk[sl])
            g.mul_(inv_temp)
            if grad_h is not None:
                grad_h[sl] = (g.to(cd) @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.to(cd).t() @ h).to(acc)
            if grad_b is not None:
                grad_b += g.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


# Same signature and preamble as ChunkedLinearLogprob on purpose: the two are drop-ins for each
# other and the tests compare them, so neither may depend on the other's code path.
class LinearLogprobFunction(torch.autograd.Function):
    """The Triton path: forward and backward kernels of ``linear_logprob_triton``.

    Same inputs as :class:`ChunkedLinearLogprob` with ``blocks`` (a
    ``linear_logprob_triton.Blocks`` or None) in place of ``chunk``. Saves only the inputs and
    the ``[N]`` logsumexp.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        k_ids: Tensor,
        inv_temp: float,
        blocks: Any,
        compute_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor]:
        from trainer.kernels import linear_logprob_triton as kt

        blocks = blocks or kt.DEFAULT_BLOCKS
        logp, lse, k_logp = kt.launch_fwd(
            hidden, weight, bias, targets, k_ids, inv_temp, compute_dtype, blocks
        )
        ctx.save_for_backward(
            hidden, weight, bias if bias is not None else torch.empty(0), targets, k_ids, lse
        )
        ctx.has_bias = bias is not None
        ctx.inv_temp, ctx.blocks, ctx.compute_dtype = inv_temp, blocks, compute_dtype
        return logp, lse, k_logp

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_logp: Tensor | None, g_lse: Tensor | None, g_k: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        from trainer.kernels import linear_logprob_triton as kt

        hidden, weight, bias, targets, k_ids, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, k = k_ids.shape
        gy, coef, gk = _upstream(g_logp, g_lse, g_k, n, k, lse)
        grad_h, grad_w, grad_b = kt.launch_bwd(
            hidden,
            weight,
            bias if ctx.has_bias else None,
            targets,
            k_ids,
            lse,
            gy,
            coef,
            gk,
            ctx.inv_temp,
            ctx.compute_dtype,
            need_h=need_h,
            need_w=need_w,
            need_b=need_b and ctx.has_bias,
            blocks=ctx.blocks,
        )
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    *,
    bias: Tensor | None = None,
    k_ids: Tensor | None = None,
    backend: Backend = "auto",
    chunk_tokens: int = 1024,
    blocks: Any = None,
) -> LinearLogprob:
    """Logprobs of ``targets`` (and of ``k_ids``) under ``softmax((hidden @ W.T + b) / T)``.

    Args:
        hidden: ``[N, H]`` final hidden states (fp32/bf16/fp16; float64 on the torch path).
        weight: ``[V, H]`` LM-head weight. bias: ``[V]`` or None.
        targets: ``[N]`` sampled ids in ``[0, V)``.
        temperature: ``T`` (the rollout's sampling temperature).
        k_ids: ``[N, K]`` extra ids in ``[0, V)`` (repeats allowed; ``K`` may be 0), or None.
        backend: ``"auto"`` (env ``OPD_LOGPROB_BACKEND``, then Triton on CUDA, else torch),
            ``"triton"`` (CPU tensors need ``TRITON_INTERPRET=1``) or ``"torch"``.
        chunk_tokens: rows per chunk of the torch path.
        blocks: tile sizes of the Triton path (``linear_logprob_triton.Blocks``), None: default.

    Under ``torch.autocast`` the projection runs in the autocast dtype (as
    ``trainer.policy.chunked_token_logprobs``); otherwise in the weight's dtype.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {hidden.shape}, {weight.shape}"
        )
    n = hidden.shape[0]
    if targets.shape != (n,):
        raise ValueError(f"targets [N={n}] expected, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias [V={weight.shape[0]}] expected, got {tuple(bias.shape)}")
    has_k = k_ids is not None
    if k_ids is None:
        k_ids = torch.zeros((n, 0), dtype=torch.long, device=hidden.device)
    elif k_ids.dim() != 2 or k_ids.shape[0] != n:
        raise ValueError(f"k_ids [N={n}, K] expected, got {tuple(k_ids.shape)}")
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else weight.dtype
    )
    dtypes = (hidden.dtype, weight.dtype, compute_dtype)
    chosen = resolve_logprob_backend(backend, hidden.device, dtypes)
    targets = targets.long().contiguous()
    k_ids = k_ids.long().contiguous()
    inv_temp = 1.0 / float(temperature)
    with torch.autocast(device_type, enabled=False):
        if chosen == "torch":
            logp, lse, k_logp = ChunkedLinearLogprob.apply(
                hidden, weight, bias, targets, k_ids, inv_temp, int(chunk_tokens), compute_dtype
            )
        else:
            logp, lse, k_logp = LinearLogprobFunction.apply(
                hidden.contiguous(),
                weight.contiguous(),
                bias.contiguous() if bias is not None else None,
                targets,
                k_ids,
                inv_temp,
                blocks,
                compute_dtype,
            )
    return LinearLogprob(logp, lse, k_logp if has_k else None)
