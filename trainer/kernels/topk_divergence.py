"""Divergence between the teacher's top-``K`` distribution (plus a tail bucket) and the student's.

At each response position (row) ``i`` the teacher named its ``K`` most likely ids; the inputs
are log-softmax values at those ids::

    student_logp  s [N, K]  the student's (fp32/bf16/fp16; carries the gradient)
    teacher_logp  t [N, K]  the teacher's (constant: detached, no gradient)

With ``q_k = exp s_k`` and ``p_k = exp t_k`` each side gets a tail bucket for the mass off the
top-``K`` ids, clamped below at ``TAIL_EPS``::

    p_tail = max(1 - sum_k p_k, TAIL_EPS)      q_tail = max(1 - sum_k q_k, TAIL_EPS)

so ``P = (p_1..p_K, p_tail)`` (teacher) and ``Q = (q_1..q_K, q_tail)`` (student) live on the
same ``K + 1`` buckets, and per row (same ``beta`` convention as TRL's generalized JSD)::

    beta = 0:      D = KL(P || Q) = sum_j P_j (log P_j - log Q_j)          (forward KL)
    beta = 1:      D = KL(Q || P) = sum_j Q_j (log Q_j - log P_j)          (reverse KL)
    0 < beta < 1:  D = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

with ``log M_j = logaddexp(log beta + log P_j, log(1 - beta) + log Q_j)``. A teacher bucket of
zero mass (``t_k = -inf``) contributes 0 (``0 log 0 = 0``).

``TAIL_EPS = 1e-6``: the tail is ``1 - sum_k exp(.)`` computed in float32, whose rounding error
is ``~K * 6e-8`` (a few ``1e-7`` up to ``1e-6`` for the trainer's ``K <= 64``), and bf16 inputs
round the top masses by far more; a tail below ``1e-6`` is rounding noise, and may even come out
``<= 0`` (top-``K`` mass ``>= 1``), so it is clamped there. ``log 1e-6 = -13.8`` keeps every
term finite. After a clamp the buckets sum to slightly more than 1 (by at most ``1e-6``), which
is left as is (so ``D`` can dip ``~1e-6`` below 0 when the student's tail is clamped).

Gradient (into ``s`` only). Writing ``w_j = d D / d log Q_j``::

    forward KL:  w_j = -P_j
    reverse KL:  w_j = Q_j (log Q_j - log P_j + 1)
    JSD:         w_j = (1 - beta) Q_j (log Q_j - log M_j)

and, through the tail, ``d log q_tail / d s_k = -q_k / q_tail`` where ``1 - sum q >= TAIL_EPS``;
where the student's tail is clamped it is the constant ``TAIL_EPS`` and passes no gradient (the
exact derivative of the clamped function, as ``torch.clamp``). So
``d D / d s_k = w_k - [tail free] q_k w_tail / q_tail``.

Two backends compute the same thing:

* ``torch`` -- :func:`reference_topk_divergence`, plain torch through autograd (the
  specification; float32 math for fp32/bf16/fp16, float64 for float64 inputs, for gradcheck).
* ``triton`` -- :class:`TopKDivergenceFunction` around the kernel of
  :mod:`trainer.kernels.topk_divergence_triton`: one forward launch writes the divergence, the
  teacher tail and ``d D / d s`` (float32); the backward is ``grad_out[:, None] * saved``, cast
  to ``student_logp``'s dtype.

``backend="auto"`` defers to ``OPD_TOPK_BACKEND`` (``auto``/``triton``/``torch``), then runs
Triton for CUDA tensors of a supported dtype (``K <= 4096``) when Triton is importable, else the
torch path. Importing this module does not import triton.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from trainer.kernels.opd_loss import choose_backend

Backend = Literal["auto", "triton", "torch"]
#: Environment variable that picks the backend when the caller passes ``backend="auto"``.
TOPK_BACKEND_ENV = "OPD_TOPK_BACKEND"
#: Lower clamp of both tail masses (see the module docstring for why this value).
TAIL_EPS = 1e-6
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Same as ``topk_divergence_triton.MAX_K`` (not imported from there: that imports triton).
_KERNEL_MAX_K = 4096


class TopKDivergence(NamedTuple):
    """Outputs of :func:`topk_divergence`."""

    divergence: Tensor  # [N] float32, differentiable w.r.t. student_logp
    teacher_tail: Tensor  # [N] float32 tail mass 1 - sum exp(teacher_logp), clamped; detached


def resolve_topk_backend(
    backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = (), k: int = 1
) -> Literal["triton", "torch"]:
    """The backend that ``topk_divergence(..., backend=backend)`` runs for these tensors.

    An explicit ``"triton"`` or ``"torch"`` always wins. ``"auto"`` first defers to
    ``OPD_TOPK_BACKEND``, then picks Triton when the tensors are on CUDA, every dtype in
    ``dtypes`` is one the kernel supports (fp32/bf16/fp16), ``k <= 4096`` and Triton is
    importable.
    """
    fits = device.type == "cuda" and all(d in _KERNEL_DTYPES for d in dtypes)
    return choose_backend(backend, TOPK_BACKEND_ENV, fits and k <= _KERNEL_MAX_K)


def _check_inputs(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> None:
    for name, x in (("student_logp", student_logp), ("teacher_logp", teacher_logp)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be [N, K], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher_logp {tuple(teacher_logp.shape)} must have student_logp's shape "
            f"{tuple(student_logp.shape)}"
        )
    if student_logp.shape[1] < 1:
        raise ValueError(f"student_logp / teacher_logp need K >= 1, got K={student_logp.shape[1]}")
    if teacher_logp.device != student_logp.device:
        raise ValueError(
            f"teacher_logp is on {teacher_logp.device}, student_logp on {student_logp.device}: "
            "both must be on the same device"
        )
    if not isinstance(beta, numbers.Real) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a real number in [0, 1], got {beta!r}")


def _kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row-wise ``sum_j a_j (log a_j - log b_j)`` with ``0 log 0 = 0``."""
    # Where a = 0 (a teacher bucket with log a = -inf) the unselected product is nan, but its
    # gradient into log_b is 0 * a = 0, and the teacher's a takes none: no nan leaks back.
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def reference_topk_divergence(
    student_logp: Tensor, teacher_logp: Tensor, beta: float
) -> TopKDivergence:
    """The specification (module docstring), in plain torch; differentiable through autograd.

    Math in float32 for fp32/bf16/fp16 inputs and in float64 for float64 inputs (outputs in
    that dtype), so that ``torch.autograd.gradcheck`` can verify the gradient.
    """
    _check_inputs(student_logp, teacher_logp, beta)
    beta = float(beta)
    acc = torch.float64 if student_logp.dtype == torch.float64 else torch.float32
    s = student_logp.to(acc)
    t = teacher_logp.detach().to(acc)
    q, p = s.exp(), t.exp()
    p_tail = torch.clamp(1.0 - p.sum(-1), min=TAIL_EPS)
    q_tail = torch.clamp(1.0 - q.sum(-1), min=TAIL_EPS)
    big_p = torch.cat((p, p_tail[:, None]), -1)
    big_q = torch.cat((q, q_tail[:, None]), -1)
    log_p = torch.cat((t, p_tail.log()[:, None]), -1)
    log_q = torch.cat((s, q_tail.log()[:, None]), -1)
    if beta == 0.0:
        div = _kl(big_p, log_p, log_q)
    elif beta == 1.0:
        div = _kl(big_q, log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        div = beta * _kl(big_p, log_p, log_m) + (1.0 - beta) * _kl(big_q, log_q, log_m)
    return TopKDivergence(div, p_tail.detach())


class TopKDivergenceFunction(torch.autograd.Function):
    """The Triton path: one forward launch; backward = ``grad_out[:, None] * saved grad``.

    Inputs ``(student_logp, teacher_logp, beta, block_n)`` (``block_n``: rows per program, a
    power of two, or None for the default); outputs ``(divergence [N], teacher_tail [N])``,
    both float32, the tail non-differentiable. Saves only the ``[N, K]`` float32 gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_logp: Tensor,
        teacher_logp: Tensor,
        beta: float,
        block_n: int | None,
    ) -> tuple[Tensor, Tensor]:
        from trainer.kernels import topk_divergence_triton as kt

        div, tail, grad = kt.launch_fwd(
            student_logp, teacher_logp, beta, TAIL_EPS, write_grad=True, block_n=block_n
        )
        ctx.save_for_backward(grad)
        ctx.student_dtype = student_logp.dtype
        ctx.mark_non_differentiable(tail)
        return div, tail

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_div: Tensor, _grad_tail: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # float32 product, rounded once to the student's dtype
        return (grad * grad_div.float()[:, None]).to(ctx.student_dtype), None, None, None


def _triton_topk_divergence(
    student_logp: Tensor, teacher_logp: Tensor, beta: float, block_n: int | None = None
) -> TopKDivergence:
    """The Triton path for validated inputs (``block_n`` as in :class:`TopKDivergenceFunction`)."""
    teacher_logp = teacher_logp.detach().contiguous()
    if student_logp.requires_grad and torch.is_grad_enabled():
        div, tail = TopKDivergenceFunction.apply(
            student_logp.contiguous(), teacher_logp, float(beta), block_n
        )
    else:
        from trainer.kernels import topk_divergence_triton as kt

        div, tail, _ = kt.launch_fwd(
            student_logp.detach(), teacher_logp, float(beta), TAIL_EPS, write_grad=False,
            block_n=block_n,
        )  # fmt: skip
    return TopKDivergence(div, tail)


def topk_divergence(
    student_logp: Tensor,
    teacher_logp: Tensor,
    beta: float,
    *,
    backend: Backend = "auto",
) -> TopKDivergence:
    """Per-row ``D_beta`` between the teacher's and the student's top-``K`` + tail buckets.

    Args:
        student_logp: ``[N, K]`` the student's log-softmax at the teacher's top-``K`` ids
            (fp32/bf16/fp16, float64 on the torch path); the gradient comes back in its dtype.
        teacher_logp: ``[N, K]`` the teacher's log-softmax at the same ids (detached).
        beta: in ``[0, 1]``: 0 forward KL, 1 reverse KL, in between the generalized JSD.
        backend: ``"auto"`` (env ``OPD_TOPK_BACKEND``, then Triton on CUDA, else torch),
            ``"triton"`` (CPU tensors need ``TRITON_INTERPRET=1``) or ``"torch"`` (the
            reference).

    Returns:
        :class:`TopKDivergence`: ``divergence [N]`` (float32; float64 for float64 inputs on the
        torch path), differentiable w.r.t. ``student_logp``, and the detached ``teacher_tail
        [N]``, ``max(1 - sum_k exp(teacher_logp), TAIL_EPS)``. ``N`` may be 0.
    """
    _check_inputs(student_logp, teacher_logp, beta)
    dtypes = (student_logp.dtype, teacher_logp.dtype)
    chosen = resolve_topk_backend(backend, student_logp.device, dtypes, student_logp.shape[1])
    if chosen == "torch":
        return reference_topk_divergence(student_logp, teacher_logp, beta)
    return _triton_topk_divergence(student_logp, teacher_logp, beta)
