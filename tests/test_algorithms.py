"""The plain-torch reference (trainer/algorithms.py) against numbers worked out by hand.

These catch errors in the specification itself (a sign, a branch, a denominator); the kernel is
checked against the reference in tests/test_kernel.py.
"""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from trainer.algorithms import (
    LossConfig,
    LossSums,
    aggregate,
    compute_advantages,
    finalize_metrics,
    jsd_per_token,
    reference_loss,
)

# ---------------------------------------------------------------------------------------------
# A 1x6 example covering every PPO branch, default config (c=1, e=0.2, C=3, token-mean).
# logp = s + log(r) with the ratio r chosen per token; A = tau - s.
#
#  t | s    tau  r   | A    pg1=-A r  pg2=-A clip(r)  max        dual (A<0: min with -3A) | L     dL/dr-path
#  0 | -1   -0.5 1.0 | 0.5  -0.5      -0.5            tie->pg1   -                        | -0.5  -A r = -0.5
#  1 | -2   -1   1.5 | 1.0  -1.5      -1.2            pg2 (clip) -                        | -1.2  0
#  2 | -1   -3   4.0 | -2   8         2.4             pg1        min(8, 6) = 6 (dual)     | 6     0
#  3 | -0.5 -1.5 0.5 | -1   0.5       0.8             pg2 (clip) 0.8 < 3                  | 0.8   0
#  4 | masked out (nan/inf inside must be ignored)
#  5 | -1   -1.5 1.1 | -0.5 0.55      0.55            tie->pg1   0.55 < 1.5               | 0.55  -A r = 0.55
#
# N = 5 tokens; loss = (-0.5 - 1.2 + 6 + 0.8 + 0.55) / 5 = 5.65 / 5 = 1.13;
# grad = [-0.5, 0, 0, 0, 0, 0.55] / 5 = [-0.1, 0, 0, 0, 0, 0.11].
HAND_S = [-1.0, -2.0, -1.0, -0.5, -0.7, -1.0]
HAND_TAU = [-0.5, -1.0, -3.0, -1.5, float("nan"), -1.5]
HAND_R = [1.0, 1.5, 4.0, 0.5, 1.0, 1.1]
HAND_MASK = [1, 1, 1, 1, 0, 1]
HAND_PPO_LOSS = 1.13
HAND_PPO_GRAD = [-0.1, 0.0, 0.0, 0.0, 0.0, 0.11]
# importance_sampling: L = -A r = [-0.5, -1.5, 8, 0.5, 0.55] over the 5 tokens.
HAND_IS_LOSS = (-0.5 - 1.5 + 8.0 + 0.5 + 0.55) / 5
HAND_IS_GRAD = [-0.5 / 5, -1.5 / 5, 8.0 / 5, 0.5 / 5, 0.0, 0.55 / 5]
HAND_METRICS = {
    "actor/pg_loss": 1.13,
    "actor/ppo_kl": -(0.0 + math.log(1.5) + math.log(4.0) + math.log(0.5) + math.log(1.1)) / 5,
    "actor/pg_clipfrac": 2 / 5,  # tokens 1 and 3
    "actor/pg_clipfrac_lower": 1 / 5,  # token 2
    "advantages/mean": (0.5 + 1.0 - 2.0 - 1.0 - 0.5) / 5,  # -0.4
    "advantages/std": math.sqrt((0.25 + 1 + 4 + 1 + 0.25) / 5 - 0.4**2),  # sqrt(1.14)
    "rollout/kl_divergence/mean": -0.5 - 1.0 + 2.0 + 1.0 + 0.5,  # one sequence: 2.0
}


def hand_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """The 1x6 example as tensors ``(logp, s, tau, mask)``; logp has inf at the masked token."""
    s = torch.tensor([HAND_S], dtype=dtype)
    logp = s + torch.tensor([HAND_R], dtype=torch.float64).log().to(dtype)
    logp[0, 0] = s[0, 0]  # exactly r = 1: the tie case
    logp[0, 4] = float("inf")
    tau = torch.tensor([HAND_TAU], dtype=dtype)
    mask = torch.tensor([HAND_MASK], dtype=torch.bool)
    return logp.requires_grad_(), s, tau, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_example_ppo(dtype: torch.dtype) -> None:
    logp, s, tau, mask = hand_inputs(dtype)
    loss, sums = reference_loss(logp, s, tau, mask, LossConfig())
    loss.backward()
    tol = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(loss.item(), HAND_PPO_LOSS, **tol)
    torch.testing.assert_close(logp.grad[0].tolist(), HAND_PPO_GRAD, **tol)
    metrics = finalize_metrics(LossSums(**sums))
    for key, want in HAND_METRICS.items():
        assert metrics[key] == pytest.approx(want, rel=1e-6, abs=1e-6), key
    assert sums["tokens"].item() == 5 and sums["seqs"].item() == 1


def test_hand_example_importance_sampling() -> None:
    logp, s, tau, mask = hand_inputs()
    loss, sums = reference_loss(logp, s, tau, mask, LossConfig(loss="importance_sampling"))
    loss.backward()
    assert loss.item() == pytest.approx(HAND_IS_LOSS, rel=1e-12)
    torch.testing.assert_close(logp.grad[0].tolist(), HAND_IS_GRAD, rtol=1e-12, atol=1e-12)
    assert sums["pg_clipfrac"].item() == 0 and sums["pg_clipfrac_lower"].item() == 0


def test_tie_gradient_is_not_split() -> None:
    # torch.maximum would give half the gradient on the pg1 == pg2 tie at r == 1; the reference
    # picks the unclipped branch explicitly, so the full -A r / N flows.
    logp, s, tau, mask = hand_inputs()
    cfg = LossConfig()
    loss, _ = reference_loss(logp[:, :1], s[:, :1], tau[:, :1], mask[:, :1], cfg)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-0.5)


def test_dual_clip_tie_keeps_full_gradient() -> None:
    # A < 0 and -A r == -A C exactly: the dual clip is not "taken" (strict >, as verl's
    # pg_clipfrac_lower) and the whole gradient -A r flows; torch.minimum would halve it.
    s = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(3.5), dtype=torch.float64, requires_grad=True)
    tau = -torch.ones(1, 1, dtype=torch.float64)  # A = -1
    r = torch.exp(logp.detach() - s).item()  # C == r bit for bit -> exact tie
    loss, sums = reference_loss(logp, s, tau, torch.ones(1, 1), LossConfig(dual_clip=r))
    loss.backward()
    assert loss.item() == r and logp.grad.item() == r
    assert sums["pg_clipfrac_lower"].item() == 0 and sums["pg_clipfrac"].item() == 0


def test_ratio_clamp_kills_gradient_beyond_20() -> None:
    # |logp - s| > 20: ratio = exp(+-20) and, as torch.clamp's backward, zero gradient;
    # exactly at the bound the gradient still flows (torch.clamp is inclusive).
    s = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[-25.0, -20.0, 21.0]], dtype=torch.float64, requires_grad=True)
    tau = torch.ones(1, 3, dtype=torch.float64)  # A = 1
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = LossConfig(loss="importance_sampling", aggregation="seq-mean-token-sum")
    loss, _ = reference_loss(logp, s, tau, mask, cfg)
    loss.backward()
    want_loss = -(math.exp(-20) + math.exp(-20) + math.exp(20))
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert logp.grad[0].tolist() == pytest.approx([0.0, -math.exp(-20), 0.0], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# advantages and j_t


def test_on_policy_distill_advantage() -> None:
    s = torch.tensor([[-1.0, -2.0, -3.0]])
    tau = torch.tensor([[-0.5, -2.5, float("-inf")]])
    mask = torch.tensor([[1, 1, 0]])
    adv = compute_advantages(s, tau, mask, LossConfig(kl_coef=2.0))
    # c (tau - s) m: 2 * 0.5, 2 * -0.5, masked -> exactly 0 even with -inf inside.
    assert adv.tolist() == [[1.0, -1.0, 0.0]]


@pytest.mark.parametrize(
    ("b", "want"),
    [
        # p_s = 0.2 (student), p_tau = 0.6 (teacher), M = b p_tau + (1-b) p_s
        (0.0, math.log(0.2) - math.log(0.6)),  # special case: s - tau
        (1.0, math.log(0.6) - math.log(0.2)),  # special case: tau - s
        # 0 < b < 1: j = s - log M (not the usual b (tau - log M) + (1-b) (s - log M))
        (0.5, math.log(0.2 / 0.4)),  # M = 0.5 * 0.6 + 0.5 * 0.2 = 0.4
        (0.3, math.log(0.2 / 0.32)),  # M = 0.3 * 0.6 + 0.7 * 0.2 = 0.32
        (0.9, math.log(0.2 / 0.56)),  # M = 0.9 * 0.6 + 0.1 * 0.2 = 0.56
    ],
)
def test_jsd_per_token_by_hand(b: float, want: float) -> None:
    s = torch.tensor([math.log(0.2)], dtype=torch.float64)
    tau = torch.tensor([math.log(0.6)], dtype=torch.float64)
    assert jsd_per_token(s, tau, b).item() == pytest.approx(want, rel=1e-12)
    cfg = LossConfig(algorithm="jsd", kl_coef=0.5, lambda_coef=b)
    adv = compute_advantages(s[None], tau[None], torch.ones(1, 1), cfg)
    assert adv.item() == pytest.approx(-0.5 * want, rel=1e-12)  # A = -c j m


def test_jsd_is_zero_when_student_equals_teacher() -> None:
    x = torch.linspace(-30, 0, 7, dtype=torch.float64)
    for b in (0.0, 0.3, 0.5, 1.0):
        assert jsd_per_token(x, x, b).abs().max().item() < 1e-12


@pytest.mark.parametrize("b", [0.1, 0.3, 0.5, 0.9])
def test_jsd_student_expectation_is_kl_student_to_mixture(b: float) -> None:
    # On an exact categorical: E_{y~S}[j(y)] = sum_y S(y) (log S(y) - log M(y)) = KL(S || M) >= 0
    # with M = b T + (1-b) S, i.e. j is the on-policy cost of the generalized JSD. The usual single-sample
    # b (tau - log M) + (1-b) (s - log M) fails this: it is <= 0 everywhere (weighted AM-GM).
    g = torch.Generator().manual_seed(int(b * 10))
    logit_s, logit_t = (torch.randn(7, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    log_s, log_t = logit_s.log_softmax(0), logit_t.log_softmax(0)
    p_s, p_t = log_s.exp(), log_t.exp()
    p_m = b * p_t + (1 - b) * p_s
    kl_s_m = (p_s * (p_s / p_m).log()).sum().item()
    j = jsd_per_token(log_s, log_t, b)
    assert (p_s * j).sum().item() == pytest.approx(kl_s_m, rel=1e-12, abs=1e-15)
    assert kl_s_m > 1e-3  # S != T: strictly positive
    # per token j has both signs: > 0 exactly where the student over-rates (S > T, so S > M)
    assert torch.equal(j > 0, p_s > p_t)
    assert (j > 0).any() and (j < 0).any()
    # so the jsd advantage -c j is negative on over-rated tokens (pushes them down)
    cfg = LossConfig(algorithm="jsd", kl_coef=2.0, lambda_coef=b)
    adv = compute_advantages(log_s[None], log_t[None], torch.ones(1, 7), cfg)[0]
    assert torch.equal(adv < 0, p_s > p_t)


def test_jsd_gradient_is_exact_policy_gradient_of_generalized_jsd() -> None:
    # d JSD_b(S, T) / d theta (autograd through the exact categorical, S = softmax(theta)) equals
    # (1-b) E_{y~S}[grad log S(y) j(y)] with j = s - log M held constant.
    b = 0.3
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    log_t = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(0)
    log_s = theta.log_softmax(0)
    p_s, p_t = log_s.exp(), log_t.exp()
    log_m = (b * p_t + (1 - b) * p_s).log()
    jsd = b * (p_t * (log_t - log_m)).sum() + (1 - b) * (p_s * (log_s - log_m)).sum()
    (want,) = torch.autograd.grad(jsd, theta, retain_graph=True)
    j = jsd_per_token(log_s.detach(), log_t, b)
    surrogate = (1 - b) * (p_s.detach() * log_s * j).sum()
    (got,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_jsd_extreme_logprobs_are_finite() -> None:
    s = torch.tensor([-1e4, 0.0, -1e4, 0.0])
    tau = torch.tensor([0.0, -1e4, -1e4, 0.0])
    for b in (0.0, 0.3, 0.5, 1.0):
        assert torch.isfinite(jsd_per_token(s, tau, b)).all()
    # s = -1e4, tau = 0, b = 0.5: log M = log(0.5) (teacher mass dominates): j = -1e4 - log 0.5;
    # s = 0, tau = -1e4: log M = log(0.5) (student mass dominates): j = -log 0.5
    j = jsd_per_token(s.double(), tau.double(), 0.5)
    assert j[0].item() == pytest.approx(-1e4 - math.log(0.5), rel=1e-12)
    assert j[1].item() == pytest.approx(-math.log(0.5), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# aggregation


def test_aggregations_by_hand() -> None:
    # importance_sampling with r = 1 (logp = s) and c = 1: L = -(tau - s) = s - tau.
    # row 0: L = [1, 2]; row 1: L = [3] (+ one masked); row 2: fully masked.
    s = torch.tensor([[1.0, 2.0], [3.0, 9.0], [5.0, 5.0]], dtype=torch.float64)
    tau = torch.zeros_like(s)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    want = {
        "token-mean": (1 + 2 + 3) / 3,
        "seq-mean-token-mean": ((1 + 2) / 2 + 3 / 1) / 2,  # the empty row is not a sequence
        "seq-mean-token-sum": ((1 + 2) + 3) / 2,
    }
    for agg, value in want.items():
        cfg = LossConfig(loss="importance_sampling", aggregation=agg)
        loss, sums = reference_loss(s.clone().requires_grad_(), s, tau, mask, cfg)
        assert loss.item() == pytest.approx(value, rel=1e-12), agg
        assert sums["seqs"].item() == 2


def test_aggregate_with_totals_is_a_share() -> None:
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert aggregate(loss, mask, "token-mean", total_tokens=6).item() == pytest.approx(1.0)
    assert aggregate(loss, mask, "seq-mean-token-sum", total_seqs=4).item() == pytest.approx(1.5)
    got = aggregate(loss, mask, "seq-mean-token-mean", total_seqs=4).item()
    assert got == pytest.approx((1.5 + 3.0) / 4)


def _random_batch(b: int, t: int, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    # mostly small log-ratios, a few large ones so clip and dual clip both fire
    d = torch.randn(b, t, generator=g, dtype=dtype) * 0.3
    d += (torch.rand(b, t, generator=g) < 0.2) * torch.randn(b, t, generator=g, dtype=dtype) * 2
    logp = s + d
    tau = s + torch.randn(b, t, generator=g, dtype=dtype)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0] = True  # at least one full row
    if b > 2:
        mask[2] = False  # and one empty row
    return logp, s, tau, mask


CONFIGS = [
    LossConfig(),
    LossConfig(loss="importance_sampling", aggregation="seq-mean-token-mean"),
    LossConfig(algorithm="jsd", lambda_coef=0.3, aggregation="seq-mean-token-sum", kl_coef=2.0),
    LossConfig(algorithm="jsd", lambda_coef=0.0, aggregation="seq-mean-token-mean"),
    LossConfig(algorithm="jsd", lambda_coef=1.0, clip_eps=0.1, dual_clip=2.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.algorithm}-{c.loss}-{c.aggregation}")
def test_gradcheck_float64(cfg: LossConfig) -> None:
    logp, s, tau, mask = _random_batch(4, 9, seed=3)
    _, sums = reference_loss(logp, s, tau, mask, cfg)
    if cfg.loss == "ppo":  # make sure the piecewise branches are actually exercised
        assert sums["pg_clipfrac"].item() > 0

    def f(x: torch.Tensor) -> torch.Tensor:
        return reference_loss(x, s, tau, mask, cfg)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_sum_to_full_batch(agg: str) -> None:
    cfg = LossConfig(algorithm="jsd", lambda_coef=0.5, aggregation=agg)
    logp, s, tau, mask = _random_batch(7, 11, seed=5)
    mask[5:] = False  # the last micro-batch is entirely masked
    full_logp = logp.clone().requires_grad_()
    full, full_sums = reference_loss(full_logp, s, tau, mask, cfg)
    full.backward()

    total_tokens = mask.sum()
    total_seqs = (mask.sum(-1) > 0).sum()
    parts, grads, sums = [], [], []
    for rows in (slice(0, 3), slice(3, 5), slice(5, 7)):
        x = logp[rows].clone().requires_grad_()
        part, part_sums = reference_loss(
            x, s[rows], tau[rows], mask[rows], cfg, total_tokens=total_tokens, total_seqs=total_seqs
        )
        part.backward()
        parts.append(part)
        grads.append(x.grad)
        sums.append(LossSums(**part_sums))
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads), full_logp.grad, rtol=1e-12, atol=1e-12)
    assert finalize_metrics(sums) == pytest.approx(finalize_metrics(LossSums(**full_sums)))
    # LossSums add with + (float32 on device, hence approx against the float64 list sum)
    assert finalize_metrics(sum(sums)) == pytest.approx(finalize_metrics(sums), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# robustness and the config


def test_all_masked_batch_is_zero_not_nan() -> None:
    logp, s, tau, _ = _random_batch(3, 5, seed=1)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        x = logp.clone().requires_grad_()
        loss, sums = reference_loss(x, s, tau, mask, LossConfig(aggregation=agg))
        loss.backward()
        assert loss.item() == 0.0
        assert (x.grad == 0).all()
        assert all(v == 0.0 for v in finalize_metrics(LossSums(**sums)).values())


def test_garbage_in_masked_positions_is_ignored() -> None:
    logp, s, tau, mask = _random_batch(4, 6, seed=2)
    mask[1, 3:] = False
    clean = [t.clone() for t in (logp, s, tau)]
    dirty = [t.clone() for t in (logp, s, tau)]
    for t, v in zip(dirty, (float("nan"), float("-inf"), float("inf")), strict=True):
        t[~mask] = v
    out = []
    for logp_, s_, tau_ in (clean, dirty):
        x = logp_.requires_grad_()
        loss, sums = reference_loss(x, s_, tau_, mask, LossConfig(algorithm="jsd"))
        loss.backward()
        out.append((loss, x.grad, sums))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)
    assert all(torch.equal(out[0][2][k], out[1][2][k]) for k in out[0][2])


def test_bf16_logp_gets_bf16_grad_and_float32_math() -> None:
    logp, s, tau, mask = _random_batch(3, 8, seed=4, dtype=torch.float32)
    x16 = logp.to(torch.bfloat16).requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    loss16, _ = reference_loss(x16, s, tau, mask, LossConfig())
    loss32, _ = reference_loss(x32, s, tau, mask, LossConfig())
    loss16.backward()
    loss32.backward()
    assert loss16.dtype == torch.float32 and x16.grad.dtype == torch.bfloat16
    assert loss16.item() == loss32.item()
    assert torch.equal(x16.grad, x32.grad.to(torch.bfloat16))


def test_loss_config_validation() -> None:
    cfg = LossConfig()
    assert (cfg.kl_coef, cfg.lambda_coef, cfg.clip_eps, cfg.dual_clip) == (1.0, 0.5, 0.2, 3.0)
    for bad in ({"lambda_coef": 1.5}, {"dual_clip": 1.0}, {"clip_eps": 0.0}, {"loss": "grpo"}):
        with pytest.raises(pydantic.ValidationError):
            LossConfig(**bad)
    with pytest.raises(pydantic.ValidationError):
        cfg.kl_coef = 2.0  # frozen


def test_shape_mismatch_is_refused() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask has shape"):
        reference_loss(x, x, x, torch.ones(2, 4), LossConfig())
