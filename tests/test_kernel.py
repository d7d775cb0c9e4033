"""The fused Triton OPD loss kernel against the plain-torch reference.

On a machine without a GPU the kernel really runs, through Triton's interpreter:
``tests/conftest.py`` imports triton and the kernel with ``TRITON_INTERPRET=1`` before any test
module, and the ``device`` fixture sets the variable again while a CPU case runs (the
interpreter consults it at launch too). On a GPU host the kernel is tested compiled, on CUDA
tensors, and ``test_interpreted_kernel_in_subprocess`` runs the CPU cases in a fresh
interpreter-mode process.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch
import triton  # noqa: F401  (imported by conftest, under the interpreter on CPU)

from tests.interpreted_kernels import DEVICES, kernel_device, run_cpu_cases
from tests.test_algorithms import (  # noqa: E402
    HAND_IS_GRAD,
    HAND_IS_LOSS,
    HAND_METRICS,
    HAND_PPO_GRAD,
    HAND_PPO_LOSS,
    hand_inputs,
)
from trainer.algorithms import LossConfig, LossSums  # noqa: E402
from trainer.kernels import finalize_metrics, opd_loss, resolve_backend  # noqa: E402
from trainer.kernels import opd_loss_triton as kernel_module  # noqa: E402

#: Whether the kernel runs on CPU tensors in this process (built for the interpreter).
INTERPRETED = kernel_module.interpreted()

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device to test on; CPU runs the kernel in Triton's interpreter."""
    return kernel_device(request, monkeypatch, interpreted=INTERPRETED, backend_env="OPD_LOSS_BACKEND")


def make_batch(
    b: int, t: int, seed: int, device: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(logp, s, tau, mask)``: ragged masks, one full and one empty row, clip-active."""
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(b, t, generator=g) * 4
    d = torch.randn(b, t, generator=g) * 0.3
    d += (torch.rand(b, t, generator=g) < 0.2) * torch.randn(b, t, generator=g) * 2.5
    logp = s + d
    tau = s + torch.randn(b, t, generator=g) * 1.5
    start = torch.randint(0, t, (b,), generator=g)
    length = torch.randint(0, t + 1, (b,), generator=g)
    pos = torch.arange(t)[None, :]
    mask = (pos >= start[:, None]) & (pos < (start + length)[:, None])  # prompt | response | pad
    mask[0] = True
    if b > 2:
        mask[2] = False
    # garbage where masked: must be ignored by both backends
    s[~mask] = float("nan")
    tau[~mask] = float("-inf")
    return (
        logp.to(device, dtype),
        s.to(device, dtype),
        tau.to(device),
        mask.to(device),
    )


def run(
    backend: str,
    logp: torch.Tensor,
    s: torch.Tensor,
    tau: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    **kw: object,
) -> tuple[torch.Tensor, torch.Tensor, LossSums]:
    x = logp.detach().clone().requires_grad_()
    loss, sums = opd_loss(x, s, tau, mask, cfg, backend=backend, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert x.grad is not None
    return loss.detach(), x.grad, sums


def assert_matches_reference(
    logp: torch.Tensor,
    s: torch.Tensor,
    tau: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    block_size: int | None = None,
    grad_tol: tuple[float, float] = (RTOL, ATOL),
    value_scale: float = 1.0,
    count_slack: int = 0,
    **kw: object,
) -> tuple[torch.Tensor, LossSums]:
    """Kernel == reference: loss, gradient, every sum and every finalized metric.

    Float sums may differ by summation order only: ``atol = ATOL * N * value_scale`` with
    ``value_scale`` the magnitude of the summed terms. Clip counts are exact up to
    ``count_slack`` tokens whose advantage is 0 up to rounding (its sign is noise there).
    """
    ref_loss, ref_grad, ref_sums = run("torch", logp, s, tau, mask, cfg, **kw)
    loss, grad, sums = run("triton", logp, s, tau, mask, cfg, block_size=block_size, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss.float(), rtol=RTOL, atol=ATOL)
    assert grad.dtype == logp.dtype
    torch.testing.assert_close(grad, ref_grad, rtol=grad_tol[0], atol=grad_tol[1])
    # Counts are exact.
    n = max(ref_sums.tokens.item(), 1.0)
    for f in LossSums.field_names():
        got, want = getattr(sums, f), getattr(ref_sums, f)
        assert got.dtype == torch.float32, f
        if f in ("tokens", "seqs", "pg_clipfrac", "pg_clipfrac_lower"):
            assert abs(got.item() - want.item()) <= count_slack, f
        else:
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * n * value_scale, msg=f)
    got_m, want_m = finalize_metrics(sums), finalize_metrics(ref_sums)
    assert got_m.keys() == want_m.keys()
    for k in want_m:
        tol = ATOL * value_scale + (count_slack / n if "clipfrac" in k else 0.0)
        assert got_m[k] == pytest.approx(want_m[k], rel=RTOL, abs=tol), k
    return grad, sums


# ---------------------------------------------------------------------------------------------
# the full grid


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss", ["ppo", "importance_sampling"])
@pytest.mark.parametrize(
    ("algorithm", "lambda_coef"),
    [
        ("on_policy_distill", 0.5),
        ("on_policy_distill", 0.0),
        ("jsd", 0.0),
        ("jsd", 1.0),
        ("jsd", 0.5),
        ("jsd", 0.3),
    ],
)
def test_kernel_matches_reference_grid(
    device: str, algorithm: str, lambda_coef: float, loss: str, aggregation: str
) -> None:
    cfg = LossConfig(
        algorithm=algorithm,
        lambda_coef=lambda_coef,
        loss=loss,
        aggregation=aggregation,
        kl_coef=1.5,
    )
    seed = zlib.crc32(f"{algorithm}{lambda_coef}{loss}{aggregation}".encode()) % 1000
    # T = 37 is not a multiple of the block (64): blocks straddle rows
    _, sums = assert_matches_reference(*make_batch(8, 37, seed, device), cfg, block_size=64)
    if loss == "ppo":  # the grid is only meaningful if the branches fire
        assert sums.pg_clipfrac.item() > 0
        # every advantage here has both signs (jsd with 0 < b < 1 too: j = s - log M > 0 where
        # s > tau), so the dual clip fires as well
        assert sums.pg_clipfrac_lower.item() > 0


@pytest.mark.parametrize(
    ("b", "t", "block_size"),
    [(1, 1, 16), (3, 5, 16), (2, 64, 64), (5, 130, 64), (4, 301, None), (9, 17, 1024)],
)
def test_kernel_shapes(device: str, b: int, t: int, block_size: int | None) -> None:
    cfg = LossConfig(algorithm="jsd", lambda_coef=0.3, aggregation="seq-mean-token-mean")
    assert_matches_reference(*make_batch(b, t, b * 1000 + t, device), cfg, block_size=block_size)


def test_kernel_hand_example(device: str) -> None:
    # The worked example of tests/test_algorithms.py, directly on the kernel.
    logp, s, tau, mask = (x.detach().to(device, torch.float32) for x in hand_inputs())
    for cfg, want_loss, want_grad in (
        (LossConfig(), HAND_PPO_LOSS, HAND_PPO_GRAD),
        (LossConfig(loss="importance_sampling"), HAND_IS_LOSS, HAND_IS_GRAD),
    ):
        loss, grad, sums = run("triton", logp, s, tau, mask, cfg, block_size=16)
        assert loss.item() == pytest.approx(want_loss, rel=1e-6)
        assert grad[0].tolist() == pytest.approx(want_grad, rel=1e-6, abs=1e-7)
    metrics = finalize_metrics(run("triton", logp, s, tau, mask, LossConfig())[2])
    for key, want in HAND_METRICS.items():
        assert metrics[key] == pytest.approx(want, rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize(
    ("b", "want_j"),
    [
        # token 0: p_s = 0.2, p_tau = 0.6; token 1: p_s = 0.6, p_tau = 0.2; M = b p_tau + (1-b) p_s
        (0.0, [math.log(0.2 / 0.6), math.log(0.6 / 0.2)]),  # s - tau
        (1.0, [math.log(0.6 / 0.2), math.log(0.2 / 0.6)]),  # tau - s
        # 0 < b < 1: j = s - log M (not the usual b (tau - log M) + (1-b) (s - log M))
        (0.5, [math.log(0.2 / 0.4), math.log(0.6 / 0.4)]),
        (0.3, [math.log(0.2 / 0.32), math.log(0.6 / 0.48)]),
        (0.9, [math.log(0.2 / 0.56), math.log(0.6 / 0.24)]),
    ],
)
def test_kernel_jsd_by_hand(device: str, b: float, want_j: list[float]) -> None:
    # importance_sampling with logp = s (r = 1), token-mean over N = 2: L_t = -A_t = c j_t,
    # d loss / d logp_t = c j_t / 2, and the sums hold sum j and sum A = -c sum j.
    c = 1.5
    s = torch.tensor([[math.log(0.2), math.log(0.6)]], device=device)
    tau = torch.tensor([[math.log(0.6), math.log(0.2)]], device=device)
    mask = torch.ones(1, 2, dtype=torch.bool, device=device)
    cfg = LossConfig(algorithm="jsd", kl_coef=c, lambda_coef=b, loss="importance_sampling")
    loss, grad, sums = run("triton", s, s, tau, mask, cfg, block_size=16)
    assert grad[0].tolist() == pytest.approx([c * j / 2 for j in want_j], rel=1e-6)
    assert loss.item() == pytest.approx(c * sum(want_j) / 2, rel=1e-6)
    assert sums.jsd.item() == pytest.approx(sum(want_j), rel=1e-6)
    assert sums.adv.item() == pytest.approx(-c * sum(want_j), rel=1e-6)


@pytest.mark.parametrize("b", [0.1, 0.5, 0.9])
def test_kernel_jsd_student_expectation_is_kl_student_to_mixture(device: str, b: float) -> None:
    # One token per outcome y of an exact categorical; with importance_sampling, logp = s and
    # token-mean over N outcomes the kernel's gradient is c j(y) / N, so
    # sum_y S(y) j(y) = E_{y~S}[j] must be KL(S || M) >= 0 (M = b T + (1-b) S).
    n, c = 9, 1.0
    g = torch.Generator().manual_seed(11)
    log_s = (torch.randn(n, generator=g, dtype=torch.float64) * 2).log_softmax(0)
    log_t = (torch.randn(n, generator=g, dtype=torch.float64) * 2).log_softmax(0)
    p_s, p_t = log_s.exp(), log_t.exp()
    kl_s_m = (p_s * (p_s / (b * p_t + (1 - b) * p_s)).log()).sum().item()
    s = log_s.float()[None].to(device)
    tau = log_t.float()[None].to(device)
    mask = torch.ones(1, n, dtype=torch.bool, device=device)
    cfg = LossConfig(algorithm="jsd", kl_coef=c, lambda_coef=b, loss="importance_sampling")
    _, grad, _ = run("triton", s, s, tau, mask, cfg, block_size=16)
    j = grad[0].double().cpu() * n / c
    assert (p_s * j).sum().item() == pytest.approx(kl_s_m, rel=1e-5)
    assert kl_s_m > 1e-3
    assert torch.equal(j > 0, p_s > p_t)  # over-rated tokens get a negative advantage


@pytest.mark.parametrize("algorithm", ["on_policy_distill", "jsd"])
def test_kernel_extreme_logprobs(device: str, algorithm: str) -> None:
    # Every combination of extreme values, including |logp - s| = 1e4 (clamped, zero gradient)
    # and exactly 20 (the inclusive clamp edge, gradient flows).
    vals = torch.tensor([-1e4, -30.0, -20.0, -1e-3, 0.0])
    grid = torch.cartesian_prod(vals, vals, vals)  # (logp, s, tau)
    logp, s, tau = (grid[:, i].reshape(5, 25).to(device) for i in range(3))
    mask = torch.ones(5, 25, dtype=torch.bool, device=device)
    for lam in (0.0, 0.3, 0.5, 1.0):
        for loss in ("ppo", "importance_sampling"):
            cfg = LossConfig(algorithm=algorithm, lambda_coef=lam, loss=loss)
            # r up to e^20 times |A| up to 1e4: compare relative to the largest gradient
            ref = run("torch", logp, s, tau, mask, cfg)[1]
            scale = max(ref.abs().max().item(), 1.0)
            assert_matches_reference(
                logp,
                s,
                tau,
                mask,
                cfg,
                block_size=32,
                grad_tol=(RTOL, ATOL * scale),
                value_scale=1e4,
                # s == tau: j_t (general b) is 0 only up to rounding, e.g. 3e-8 in torch's
                # logaddexp and exactly 0 in the kernel; which clip branch wins there is noise
                count_slack=int((s == tau).sum()) if algorithm == "jsd" else 0,
            )


def test_kernel_bf16_inputs(device: str) -> None:
    logp, s, tau, mask = make_batch(4, 50, 7, device, dtype=torch.bfloat16)
    for cfg in (LossConfig(), LossConfig(algorithm="jsd", aggregation="seq-mean-token-sum")):
        # Same fp32 math on the same upcast bf16 values; the bf16 gradients may differ only where
        # a last-bit fp32 difference crosses a bf16 rounding boundary.
        assert_matches_reference(logp, s, tau, mask, cfg, block_size=64, grad_tol=(2**-7, 1e-6))


def test_kernel_all_masked_and_empty(device: str) -> None:
    logp, s, tau, _ = make_batch(3, 10, 1, device)
    for mask in (
        torch.zeros(3, 10, dtype=torch.bool, device=device),
        torch.zeros(3, 10, device=device),
    ):
        for agg in AGGREGATIONS:
            loss, grad, sums = run("triton", logp, s, tau, mask, LossConfig(aggregation=agg))
            assert loss.item() == 0.0 and (grad == 0).all()
            assert all(v == 0.0 for v in finalize_metrics(sums).values())
    empty = torch.zeros(0, 5, device=device)
    loss, grad, _ = run("triton", empty, empty, empty, empty.bool(), LossConfig())
    assert loss.item() == 0.0 and grad.shape == (0, 5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_kernel_micro_batches_sum_to_full_batch(device: str, aggregation: str) -> None:
    cfg = LossConfig(aggregation=aggregation)
    logp, s, tau, mask = make_batch(8, 29, 11, device)
    mask[6:] = False
    full_loss, full_grad, full_sums = run("triton", logp, s, tau, mask, cfg)
    totals = {"total_tokens": mask.sum(), "total_seqs": (mask.sum(-1) > 0).sum().item()}
    losses, grads, sums = [], [], []
    for rows in (slice(0, 1), slice(1, 6), slice(6, 8)):
        part = run("triton", logp[rows], s[rows], tau[rows], mask[rows], cfg, **totals)
        losses.append(part[0])
        grads.append(part[1])
        sums.append(part[2])
    torch.testing.assert_close(sum(losses), full_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=RTOL, atol=ATOL)
    assert finalize_metrics(sums) == pytest.approx(finalize_metrics(full_sums), rel=RTOL, abs=ATOL)


# ---------------------------------------------------------------------------------------------
# the autograd wrapper and the dispatch


def test_kernel_backward_scales_by_grad_output(device: str) -> None:
    logp, s, tau, mask = make_batch(3, 20, 2, device)
    cfg = LossConfig(algorithm="jsd")
    grads = []
    for backend in ("torch", "triton"):
        x = logp.clone().requires_grad_()
        loss, _ = opd_loss(x, s, tau, mask, cfg, backend=backend)  # type: ignore[arg-type]
        (2.5 * loss + 1.0).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=RTOL, atol=ATOL)


def test_kernel_without_grad_and_float_mask_and_strides(device: str) -> None:
    logp, s, tau, mask = make_batch(4, 24, 3, device)
    cfg = LossConfig()
    want, want_sums = opd_loss(logp, s, tau, mask, cfg, backend="torch")
    # logp without requires_grad: the kernel skips the gradient store
    got, got_sums = opd_loss(logp, s, tau, mask.float(), cfg, backend="triton")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_sums.pg_loss, want_sums.pg_loss, rtol=RTOL, atol=1e-5)
    # non-contiguous views (columns of a transposed buffer)
    nc = [x.t().contiguous().t() for x in (logp, s, tau)]
    assert not nc[0].is_contiguous()
    got, _ = opd_loss(*nc, mask, cfg, backend="triton")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_kernel_is_deterministic(device: str) -> None:
    batch = make_batch(5, 300, 9, device)
    a = run("triton", *batch, LossConfig(algorithm="jsd"), block_size=64)
    b = run("triton", *batch, LossConfig(algorithm="jsd"), block_size=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(
        torch.equal(x, y)
        for x, y in zip(dataclasses.astuple(a[2]), dataclasses.astuple(b[2]), strict=True)
    )


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("OPD_LOSS_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", cuda) == "triton"  # triton is importable here
    assert resolve_backend("torch", cuda) == "torch"
    monkeypatch.setenv("OPD_LOSS_BACKEND", "triton")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"  # an explicit choice beats the env
    monkeypatch.setenv("OPD_LOSS_BACKEND", "torch")
    assert resolve_backend("auto", cuda) == "torch"
    monkeypatch.setenv("OPD_LOSS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="OPD_LOSS_BACKEND"):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("fast", cpu)


def test_env_override_runs_the_kernel(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_LOSS_BACKEND", "triton")
    logp, s, tau, mask = make_batch(2, 8, 4, device)
    x = logp.clone().requires_grad_()
    loss, _ = opd_loss(x, s, tau, mask, LossConfig())
    assert loss.grad_fn is not None and "OPDLossFunction" in type(loss.grad_fn).__name__


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_module, "interpreted", lambda: False)
    x = torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opd_loss(x, x, x, torch.ones(1, 4), LossConfig(), backend="triton")


if not INTERPRETED:  # a CUDA host; on CPU the cases ran in this process

    def test_interpreted_kernel_in_subprocess() -> None:
        run_cpu_cases(__file__)
