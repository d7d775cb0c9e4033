"""On-policy distillation losses: the plain-torch reference (the specification).

Everything here follows docs/design.md §4 line by line, written for readability, not speed.
The fused Triton kernel in :mod:`trainer.kernels` must reproduce these numbers to float32
rounding; ``tests/test_kernel.py`` checks that and ``tests/test_algorithms.py`` checks the
formulas themselves against hand-computed values.

**The ``jsd`` cost for ``0 < b < 1`` is not the usual one.** The usual
single-sample ``j_t = b (tau - log M) + (1-b) (s - log M)`` (Trinity-RFT's) is never
positive there (weighted AM-GM), so the advantage ``-c j_t`` is never negative and training with it
pushes the student *away* from the teacher (tiny models: held-out reverse KL 5.29 -> 10.34 in 8
steps). This module uses ``j_t = s - log M`` instead (same ``log M``; 5.23 -> 2.50), the cost whose
policy gradient is exact:

    JSD_b(S, T) = b KL(T || M) + (1-b) KL(S || M),   M = b T + (1-b) S,   grad M = (1-b) grad S
    grad JSD_b = (1-b) sum_y grad S(y) (log S(y) - log M(y))  (the grad M / M terms cancel)
               = (1-b) E_{y~S}[grad log S(y) (log S(y) - log M(y))]  ((1-b) > 0 folds into c).

``b == 0`` (``s - tau``) and ``b == 1`` (``tau - s``) are the usual end points. ``b == 1``
trains *away* from the teacher, so the config refuses it unless ``allow_anti_distillation`` is
set (:mod:`trainer.config`).

Notation for one batch, all tensors ``[B, T]``:

* ``logp`` -- ``log pi_theta(y_t)`` of the sampled token under the policy being trained (the only
  input that carries gradient);
* ``s`` -- the behaviour (rollout) logprob of the same token;
* ``tau`` -- the teacher logprob of the same token;
* ``mask`` -- 1 on response tokens, 0 on prompt and padding. Treated as boolean (``mask != 0``).
  Values of ``logp``/``s``/``tau`` at masked-out positions are ignored entirely, even when they are
  ``nan`` or ``inf``: they are replaced by 0 before any arithmetic, so they can neither poison the
  loss nor the gradient (``0 * nan`` would).

Advantages are constants (no gradient flows into ``s`` or ``tau``). Arithmetic is done in float32
(float64 when ``logp`` is float64, which is what ``gradcheck`` needs); a bf16/fp16 ``logp`` gets
its gradient back in its own dtype.

Aggregation (``N_tok`` = number of response tokens, ``n_b`` = response tokens of row ``b``,
``N_seq`` = number of rows with ``n_b >= 1``; rows without any response token are skipped, never
divided by zero):

* ``token-mean``:          ``sum_{b,t} m L / N_tok``
* ``seq-mean-token-mean``: ``sum_b (sum_t m L / n_b) / N_seq``
* ``seq-mean-token-sum``:  ``sum_b (sum_t m L) / N_seq``

Micro-batching: pass the *whole* batch's ``N_tok`` as ``total_tokens`` and ``N_seq`` as
``total_seqs`` to every micro-batch call; each call then returns its share and the shares add up
to the full-batch loss for all three aggregations. Micro-batches must hold whole sequences (split
along ``B``, never along ``T``). A zero denominator means an all-masked batch: the loss is 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from trainer.config_sections import Aggregation, LossConfig

#: Log-ratio clamp of docs/design.md §4: ``r = exp(clamp(logp - s, -LOG_RATIO_CLAMP, +LOG_RATIO_CLAMP))``.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# formulas


def jsd_per_token(s: Tensor, tau: Tensor, lambda_coef: float) -> Tensor:
    """Per-token generalized JSD cost ``j_t`` (the advantage of ``jsd`` is ``-c j_t``).

    ``0 < b < 1``: with ``log M = logsumexp(s + log(1-b), tau + log b)`` (the log of the mixture
    ``M = b*teacher + (1-b)*student``), ``j = s - log M``. This is not the usual single-sample
    cost (``b*(tau - log M) + (1-b)*(s - log M)``, which is ``<= 0`` and trains away from the teacher;
    see the module docstring): ``s - log M`` is the on-policy cost whose policy gradient is exactly
    ``grad JSD_b / (1-b)``. Its expectation under the student is ``KL(S || M) >= 0``; per token it
    is positive where the student over-rates the token (``s > tau``) and negative where it
    under-rates it, so the advantage has both signs and the dual clip can fire.

    ``b == 0``: ``s - tau`` (reverse-KL estimate, the limit of ``s - log M``). ``b == 1``:
    ``tau - s``, the usual end point; its advantage ``c (s - tau)`` is the *negated*
    distillation signal (it rewards moving away from the teacher), which the config refuses
    without ``allow_anti_distillation``. The kernel branches on exactly the same float
    equalities.
    """
    b = float(lambda_coef)
    if b == 0.0:
        return s - tau
    if b == 1.0:
        return tau - s
    log_m = torch.logaddexp(s + math.log(1.0 - b), tau + math.log(b))
    return s - log_m


def compute_advantages(s: Tensor, tau: Tensor, mask: Tensor, cfg: LossConfig) -> Tensor:
    """Per-token advantages ``A_t`` (constants, no gradient), 0 where ``mask`` is 0.

    ``on_policy_distill``: ``c * (tau - s) * m``; ``jsd``: ``-c * j_t * m``. Computed in float32
    (float64 for float64 input). Masked positions are exactly 0 whatever ``s``/``tau`` hold there.
    """
    m = _bool_mask(mask)
    dtype = _compute_dtype(s.dtype)
    s = torch.where(m, s.detach().to(dtype), 0.0)
    tau = torch.where(m, tau.detach().to(dtype), 0.0)
    if cfg.algorithm == "on_policy_distill":
        adv = cfg.kl_coef * (tau - s)
    else:
        adv = -cfg.kl_coef * jsd_per_token(s, tau, cfg.lambda_coef)
    return torch.where(m, adv, 0.0)


def per_token_loss(
    logp: Tensor, s: Tensor, adv: Tensor, cfg: LossConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Unmasked per-token policy loss ``L_t`` plus the clip indicators ``(L, clipped, dual)``.

    ``r = exp(clamp(logp - s, -20, 20))``. ``ppo``: ``L = max(-A r, -A clip(r, 1-e, 1+e))`` and,
    where ``A < 0``, ``L = min(L, -A C)``. ``importance_sampling``: ``L = -A r``.

    Ties are broken explicitly with ``torch.where`` (``torch.maximum`` would split the gradient
    half/half on a tie): the clipped branch is taken only when strictly larger, the dual clip
    only when ``L`` strictly exceeds ``-A C``. ``clipped``/``dual`` are therefore exactly "the
    clipped (resp. dual-clip) branch was taken", the same as verl's ``pg_clipfrac`` (``pg2 > pg1``)
    and ``pg_clipfrac_lower`` (``A < 0 and max(pg1, pg2) > -A C``).
    """
    ratio = torch.exp(torch.clamp(logp - s, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    if cfg.loss == "importance_sampling":
        no = torch.zeros_like(pg1, dtype=torch.bool)
        return pg1, no, no
    pg2 = -adv * torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    clipped = pg2 > pg1
    loss = torch.where(clipped, pg2, pg1)
    pg3 = -adv * cfg.dual_clip
    dual = (adv < 0) & (loss > pg3)
    loss = torch.where(dual, pg3, loss)
    return loss, clipped, dual


def aggregate(
    loss: Tensor,
    mask: Tensor,
    aggregation: Aggregation,
    *,
    total_tokens: float | Tensor | None = None,
    total_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduce a masked per-token loss ``[B, T]`` to a scalar (see the module docstring).

    ``total_tokens`` / ``total_seqs`` replace this call's own ``N_tok`` / ``N_seq`` so that a
    micro-batch returns its share of the full batch's loss.
    """
    m = _bool_mask(mask)
    loss = torch.where(m, loss, 0.0)
    row_tokens = m.sum(-1).to(loss.dtype)
    if aggregation == "token-mean":
        n_tok = _denominator(total_tokens, row_tokens.sum())
        return loss.sum() / n_tok
    n_seq = _denominator(total_seqs, (row_tokens > 0).sum().to(loss.dtype))
    per_seq = loss.sum(-1)
    if aggregation == "seq-mean-token-mean":
        per_seq = per_seq / _safe(row_tokens)
    return per_seq.sum() / n_seq


def reference_loss(
    logp: Tensor,
    s: Tensor,
    tau: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    total_tokens: float | Tensor | None = None,
    total_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The OPD loss and its metric sums, in plain torch (differentiable w.r.t. ``logp`` only).

    Returns ``(loss, sums)``: ``loss`` is a 0-dim tensor (float32, float64 for float64 ``logp``)
    and ``sums`` maps every :class:`LossSums` field name to a detached float32 0-dim tensor.
    """
    _check_shapes(logp, s, tau, mask)
    m = _bool_mask(mask)
    dtype = _compute_dtype(logp.dtype)
    # Masked positions may hold anything (padding, -inf): zero them first so no 0 * nan appears
    # in the forward or the backward.
    logp32 = torch.where(m, logp.to(dtype), 0.0)
    s32 = torch.where(m, s.detach().to(dtype), 0.0)
    tau32 = torch.where(m, tau.detach().to(dtype), 0.0)

    adv = compute_advantages(s32, tau32, m, cfg)
    token_loss, clipped, dual = per_token_loss(logp32, s32, adv, cfg)
    token_loss = torch.where(m, token_loss, 0.0)
    loss = aggregate(
        token_loss, m, cfg.aggregation, total_tokens=total_tokens, total_seqs=total_seqs
    )

    with torch.no_grad():
        row_tokens = m.sum(-1)
        j = torch.where(m, jsd_per_token(s32, tau32, cfg.lambda_coef), 0.0)
        sums = {
            "tokens": row_tokens.sum(),
            "seqs": (row_tokens > 0).sum(),
            "pg_loss": token_loss.sum(),
            "pg_clipfrac": (clipped & m).sum(),
            "pg_clipfrac_lower": (dual & m).sum(),
            "ppo_kl": torch.where(m, s32 - logp32, 0.0).sum(),
            "kl": torch.where(m, s32 - tau32, 0.0).sum(),
            "jsd": j.sum(),
            "adv": adv.sum(),
            "adv_sq": (adv * adv).sum(),
        }
        sums = {k: v.to(torch.float32) for k, v in sums.items()}
    return loss, sums


# --------------------------------------------------------------------------------------------
# metrics


class AdditiveSums:
    """Base of frozen dataclasses of 0-dim tensor sums: ``+`` adds field by field (and the
    builtin ``sum`` works), :meth:`as_tensor` / :meth:`from_tensor` pack them into one vector
    for a single ``all_reduce``."""

    def __add__(self: _S, other: _S) -> _S:
        return type(self)(*(getattr(self, f) + getattr(other, f) for f in self.field_names()))

    def __radd__(self: _S, other: object) -> _S:
        # Lets the builtin ``sum(parts)`` start from its integer 0.
        if other == 0:
            return self
        return NotImplemented  # type: ignore[return-value]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The field names, in order (the order of :meth:`as_tensor`)."""
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def as_tensor(self) -> Tensor:
        """All fields stacked into one float32 vector, e.g. for a single ``all_reduce``."""
        return torch.stack([getattr(self, f).to(torch.float32) for f in self.field_names()])

    @classmethod
    def from_tensor(cls: type[_S], vec: Tensor) -> _S:
        """Inverse of :meth:`as_tensor`."""
        return cls(*vec.unbind(0))


_S = TypeVar("_S", bound=AdditiveSums)


@dataclasses.dataclass(frozen=True)
class LossSums(AdditiveSums):
    """Additive metric sums of one loss call; add the parts of a micro-batched step with ``+``.

    Every field is a float32 0-dim tensor on the loss's device (kept on device so the training
    loop never syncs; :func:`finalize_metrics` does the one host transfer). All sums run over
    response tokens only (``mask != 0``):

    * ``tokens``: ``sum m``; ``seqs``: rows with at least one response token;
    * ``pg_loss``: ``sum m L_t`` (per-token policy loss, before aggregation);
    * ``pg_clipfrac``: tokens where the PPO clipped branch was taken (``pg2 > pg1``);
    * ``pg_clipfrac_lower``: tokens where the dual clip was taken (``A < 0`` and
      ``max(pg1, pg2) > -A C``); both 0 for ``importance_sampling``;
    * ``ppo_kl``: ``sum m (s - logp)`` (unclamped log ratio);
    * ``kl``: ``sum m (s - tau)``, the single-sample reverse-KL estimate;
    * ``jsd``: ``sum m j_t`` at the config's ``lambda_coef`` (logged for both algorithms);
    * ``adv`` / ``adv_sq``: ``sum m A`` and ``sum m A^2``.

    Float32 counts are exact up to 2**24 tokens per step.
    """

    tokens: Tensor
    seqs: Tensor
    pg_loss: Tensor
    pg_clipfrac: Tensor
    pg_clipfrac_lower: Tensor
    ppo_kl: Tensor
    kl: Tensor
    jsd: Tensor
    adv: Tensor
    adv_sq: Tensor


def finalize_metrics(sums: LossSums | Sequence[LossSums] | Iterable[LossSums]) -> dict[str, float]:
    """Turn (a list of) :class:`LossSums` into the logged scalars (docs/design.md §6).

    With ``N = tokens`` and ``S = seqs`` summed over all parts:

    * ``actor/pg_loss`` = ``pg_loss / N`` -- token mean of the per-token loss ``L_t``. For the
      default ``token-mean`` aggregation this is the optimized loss; for the ``seq-mean-*``
      aggregations it is still the token mean, so runs stay comparable;
    * ``actor/ppo_kl`` = ``ppo_kl / N``; ``actor/pg_clipfrac`` = ``pg_clipfrac / N``;
      ``actor/pg_clipfrac_lower`` = ``pg_clipfrac_lower / N`` (over all tokens, as verl);
    * ``advantages/mean`` = ``adv / N``; ``advantages/std`` = population std
      ``sqrt(max(adv_sq / N - mean**2, 0))``;
    * ``rollout/kl_divergence/mean`` = ``kl / S``: the mean over sequences of the per-sequence
      KL ``sum_t m_t (s_t - tau_t)`` (the sum of per-sequence sums is the token sum, so no
      per-row buffer is needed);
    * ``rollout/jsd/mean`` = ``jsd / N`` (per-token mean).

    Empty denominators give 0.0, never nan. One device-to-host copy.
    """
    parts = [sums] if isinstance(sums, LossSums) else list(sums)
    if not parts:
        raise ValueError("finalize_metrics needs at least one LossSums")
    vec = torch.stack([p.as_tensor().to(parts[0].tokens.device) for p in parts]).double().sum(0)
    v = dict(zip(LossSums.field_names(), vec.cpu().tolist(), strict=True))
    n_tok, n_seq = v["tokens"], v["seqs"]

    def per_token(x: float) -> float:
        return x / n_tok if n_tok > 0 else 0.0

    adv_mean = per_token(v["adv"])
    adv_var = max(per_token(v["adv_sq"]) - adv_mean * adv_mean, 0.0)
    return {
        "actor/pg_loss": per_token(v["pg_loss"]),
        "actor/ppo_kl": per_token(v["ppo_kl"]),
        "actor/pg_clipfrac": per_token(v["pg_clipfrac"]),
        "actor/pg_clipfrac_lower": per_token(v["pg_clipfrac_lower"]),
        "advantages/mean": adv_mean,
        "advantages/std": math.sqrt(adv_var),
        "rollout/kl_divergence/mean": v["kl"] / n_seq if n_seq > 0 else 0.0,
        "rollout/jsd/mean": per_token(v["jsd"]),
    }


# --------------------------------------------------------------------------------------------
# helpers (shared with trainer.kernels so both backends treat inputs identically)


def _bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for fp32/bf16/fp16; float64 stays float64 (so gradcheck can run on the reference).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe(x: Tensor) -> Tensor:
    # A zero denominator only occurs with an all-zero numerator (nothing unmasked); replacing it
    # by 1 yields 0 and, unlike where(x > 0, a / x, 0), keeps nan out of the backward too.
    return torch.where(x > 0, x, torch.ones_like(x))


def _denominator(total: float | Tensor | None, local: Tensor) -> Tensor:
    if total is None:
        return _safe(local)
    return _safe(torch.as_tensor(total, dtype=local.dtype, device=local.device))


def _check_shapes(logp: Tensor, s: Tensor, tau: Tensor, mask: Tensor) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("s", s), ("tau", tau), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}; they must match"
            )
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device}, logp on {logp.device}")
