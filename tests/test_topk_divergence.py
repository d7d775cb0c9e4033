"""The top-``K`` divergence: its torch reference against independent numbers, and the fused
Triton kernel against the reference.

As in ``tests/test_linear_logprob.py``: without a GPU the kernel runs through Triton's
interpreter, on a GPU host it is tested compiled on CUDA tensors and
``test_interpreted_kernel_in_subprocess`` reruns the CPU cases in interpreter mode. Shapes are
tiny and ragged: ``N = 37`` rows in programs of 16, ``K = 5`` and ``20`` (not powers of two).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.interpreted_kernels import DEVICES, REPO_ROOT, kernel_device, run_cpu_cases
from trainer.kernels import topk_divergence_triton as kt
from trainer.kernels.topk_divergence import (
    TAIL_EPS,
    TopKDivergence,
    TopKDivergenceFunction,
    reference_topk_divergence,
    resolve_topk_backend,
    topk_divergence,
)

INTERPRETED = kt.interpreted()
BETAS = [0.0, 0.5, 1.0]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device to test on; CPU runs the kernel in Triton's interpreter."""
    return kernel_device(
        request, monkeypatch, interpreted=INTERPRETED, backend_env="OPD_TOPK_BACKEND"
    )


def make_logp(
    n: int, k: int, *, seed: int, vocab: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student, teacher)`` log-softmax values at the teacher's top-``k`` of ``vocab`` ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or k + 9
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    student = teacher + torch.randn(n, vocab, generator=g, dtype=torch.float64)
    ids = teacher.topk(k, dim=-1).indices
    s = torch.log_softmax(student, -1).gather(1, ids)
    t = torch.log_softmax(teacher, -1).gather(1, ids)
    return s.to(dtype), t.to(dtype)


def np_divergence(s: np.ndarray, t: np.ndarray, beta: float) -> np.ndarray:
    """An independent float64 numpy spelling of the specification, bucket arrays explicit."""
    q, p = np.exp(s), np.exp(t)
    big_q = np.concatenate([q, np.maximum(1.0 - q.sum(1), TAIL_EPS)[:, None]], 1)
    big_p = np.concatenate([p, np.maximum(1.0 - p.sum(1), TAIL_EPS)[:, None]], 1)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log(a / b), 0.0).sum(1)

    if beta == 0.0:
        return kl(big_p, big_q)
    if beta == 1.0:
        return kl(big_q, big_p)
    m = beta * big_p + (1.0 - beta) * big_q
    return beta * kl(big_p, m) + (1.0 - beta) * kl(big_q, m)


def run(
    s: torch.Tensor, t: torch.Tensor, beta: float, g: torch.Tensor, how: str, block_n: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(divergence, teacher_tail, d sum(g * divergence) / d s)`` through one path."""
    leaf = s.detach().clone().requires_grad_()
    if how == "function":  # the Triton path with several programs a launch
        div, tail = TopKDivergenceFunction.apply(leaf, t, beta, block_n)
    elif how == "reference":
        div, tail = reference_topk_divergence(leaf, t, beta)
    else:
        div, tail = topk_divergence(leaf, t, beta, backend=how)  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad((div * g).sum(), leaf)
    assert not tail.requires_grad
    return div.detach(), tail, grad


# --- the reference -----------------------------------------------------------------------------


def test_reference_hand_computed() -> None:
    # Teacher (0.5, 0.25 | tail 0.25), student (0.25, 0.25 | tail 0.5), worked out by hand:
    # both KLs are 0.25 ln 2, the JSD(1/2) is 0.5 ln(4/3) + 0.25 ln(2/3) (M = 3/8, 1/4, 3/8),
    # and the gradients follow the module docstring's w_k - q_k w_tail / q_tail.
    s = torch.tensor([[0.25, 0.25]], dtype=torch.float64).log().requires_grad_()
    t = torch.tensor([[0.5, 0.25]], dtype=torch.float64).log()
    ln2 = math.log(2.0)
    want = {
        0.0: (0.25 * ln2, [-0.375, -0.125]),
        1.0: (0.25 * ln2, [-0.5 * ln2, -0.25 * ln2]),
        0.5: (0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3), None),
    }
    for beta, (div, grad) in want.items():
        out = reference_topk_divergence(s, t, beta)
        assert isinstance(out, TopKDivergence) and out.divergence.dtype == torch.float64
        torch.testing.assert_close(out.divergence, torch.tensor([div], dtype=torch.float64))
        torch.testing.assert_close(out.teacher_tail, torch.tensor([0.25], dtype=torch.float64))
        if grad is not None:
            (got,) = torch.autograd.grad(out.divergence.sum(), s)
            torch.testing.assert_close(got, torch.tensor([grad], dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_reference_matches_numpy(beta: float) -> None:
    s, t = make_logp(6, 4, seed=1)
    # plus a row whose teacher top-k mass exceeds 1 (tail clamped) and one whose student's does
    s[0], t[0] = (
        torch.tensor([0.6, 0.2, 0.1, 0.05]).log(),
        torch.tensor([0.7, 0.2, 0.1, 1e-3]).log(),
    )
    s[1] = torch.tensor([0.7, 0.2, 0.1, 0.05]).log()
    want = np_divergence(s.numpy(), t.numpy(), beta)
    out = reference_topk_divergence(s, t, beta)
    np.testing.assert_allclose(out.divergence.numpy(), want, rtol=1e-12, atol=1e-14)
    assert out.teacher_tail[0] == TAIL_EPS
    # float32 inputs: float32 math, the same numbers to float32 rounding
    out32 = reference_topk_divergence(s.float(), t.float(), beta)
    assert out32.divergence.dtype == torch.float32
    np.testing.assert_allclose(out32.divergence.numpy(), want, rtol=1e-5, atol=1e-6)


def test_reference_properties() -> None:
    s, t = make_logp(32, 6, seed=2)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        div = reference_topk_divergence(s, t, beta).divergence
        assert (div > 0).all(), beta
        same = reference_topk_divergence(t, t, beta).divergence
        torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-12)
    # the same buckets through torch's own KL (F.kl_div(log b, log a) = sum a (log a - log b))
    q_tail = 1.0 - s.exp().sum(-1, keepdim=True)
    p_tail = 1.0 - t.exp().sum(-1, keepdim=True)
    log_q = torch.cat((s, q_tail.log()), -1)
    log_p = torch.cat((t, p_tail.log()), -1)

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)

    torch.testing.assert_close(reference_topk_divergence(s, t, 0.0).divergence, kl(log_p, log_q))
    torch.testing.assert_close(reference_topk_divergence(s, t, 1.0).divergence, kl(log_q, log_p))
    for beta in (0.2, 0.7):
        log_m = (beta * log_p.exp() + (1 - beta) * log_q.exp()).log()
        jsd = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
        torch.testing.assert_close(reference_topk_divergence(s, t, beta).divergence, jsd)
        # a JSD is bounded by the entropy-mixing bound -beta log beta - (1-beta) log(1-beta)
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert (jsd <= bound).all()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reference_gradcheck_float64(beta: float) -> None:
    s, t = make_logp(4, 3, seed=3)
    # a row whose student top-k mass is 1.01 (tail clamped: no gradient through the tail)
    s[3] = torch.tensor([0.6, 0.3, 0.11], dtype=torch.float64).log()
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reference_topk_divergence(x, t, beta)[0], (s,))


# --- the kernel against the reference ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(("n", "k"), [(1, 5), (37, 20)])
def test_kernel_matches_reference(
    device: str, dtype: torch.dtype, beta: float, n: int, k: int
) -> None:
    s64, t64 = make_logp(n, k, seed=n + k, vocab=3 * k)
    s, t = s64.to(device, dtype), t64.to(device, dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(device)
    ref = run(s, t, beta, g, "reference")
    for how in ("triton", "function"):
        got = run(s, t, beta, g, how)
        assert got[0].dtype == got[1].dtype == torch.float32 and got[0].device.type == device
        assert got[2].dtype == dtype
        # Both paths do float32 math on the same (bf16-exact) values: the forward agrees to
        # float32 rounding for either dtype. The gradient carries q_k / q_tail, and the tail
        # 1 - sum_k q_k loses digits to cancellation (an ulp of each exp over a tail of ~1e-2:
        # ~1e-5 relative here, for either path against float64); the bf16 gradient may also
        # round to a neighbouring bf16 value.
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
        if dtype == torch.float32:
            torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=1e-2, atol=1e-5)
    if dtype == torch.bfloat16:
        # and the bf16 rounding of the inputs moves the float64 truth by about 1%
        exact = reference_topk_divergence(s64, t64, beta).divergence
        torch.testing.assert_close(got[0].double().cpu(), exact, rtol=5e-2, atol=1e-3)


def test_kernel_hand_computed(device: str) -> None:
    s = torch.tensor([[0.25, 0.25]]).log().to(device)
    t = torch.tensor([[0.5, 0.25]]).log().to(device)
    div, tail, grad = run(s, t, 0.0, torch.ones(1, device=device), "triton")
    torch.testing.assert_close(div.cpu(), torch.tensor([0.25 * math.log(2.0)]))
    torch.testing.assert_close(tail.cpu(), torch.tensor([0.25]))
    torch.testing.assert_close(grad.cpu(), torch.tensor([[-0.375, -0.125]]))


def test_kernel_empty(device: str) -> None:
    s = torch.zeros(0, 5, device=device, requires_grad=True)
    for beta in BETAS:
        out = topk_divergence(s, torch.zeros(0, 5, device=device), beta, backend="triton")
        assert out.divergence.shape == out.teacher_tail.shape == (0,)
        out.divergence.sum().backward()
        assert s.grad is not None and s.grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_clamped_tail_stays_finite(device: str, dtype: torch.dtype) -> None:
    # Row 0: the teacher's K ids carry all its mass (log-softmax over those K alone, so the
    # rounded sum is ~1, bf16 pushes it past 1); row 1: the student's too; row 2: both.
    # (bf16/fp16 round those masses by ~1e-3 either way: shift them to ~1.01, a sure clamp)
    shift = 0.0 if dtype == torch.float32 else 0.01
    s, t = make_logp(5, 6, seed=4)
    t[0] = torch.log_softmax(torch.randn(6, dtype=torch.float64) * 3, -1) + shift
    s[1] = torch.log_softmax(torch.randn(6, dtype=torch.float64) * 3, -1) + shift
    s[2], t[2] = s[1], t[0]
    s, t = s.to(device, dtype), t.to(device, dtype)
    g = torch.ones(5, device=device)
    for beta in BETAS:
        ref = run(s, t, beta, g, "reference")
        got = run(s, t, beta, g, "triton")
        for x in got:
            assert torch.isfinite(x).all(), beta
        assert (got[1][[0, 2]] == TAIL_EPS).all()
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
        # (gradients through a tail of ~TAIL_EPS are large: relative tolerance)
        rtol = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=rtol, atol=1e-5)


def test_kernel_zero_teacher_mass(device: str) -> None:
    # A teacher logprob of -inf (mass 0) contributes 0 log 0 = 0 under forward KL and the JSD.
    s, t = make_logp(3, 4, seed=5)
    t[1, 3] = -math.inf
    s, t = s.float().to(device), t.float().to(device)
    g = torch.ones(3, device=device)
    for beta in (0.0, 0.5):
        ref = run(s, t, beta, g, "reference")
        got = run(s, t, beta, g, "triton")
        for a, b in zip(got, ref, strict=True):
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_without_grad_and_deterministic(device: str) -> None:
    s, t = make_logp(37, 5, seed=6)
    s, t = s.float().to(device), t.float().to(device)
    with_grad = run(s, t, 0.5, torch.ones(37, device=device), "triton")
    for _ in range(2):
        out = topk_divergence(s, t, 0.5, backend="triton")  # s needs no grad: no grad stored
        assert not out.divergence.requires_grad
        assert torch.equal(out.divergence, with_grad[0])
        assert torch.equal(out.teacher_tail, with_grad[1])
    with torch.no_grad():
        out = topk_divergence(s.clone().requires_grad_(), t, 0.5, backend="triton")
    assert not out.divergence.requires_grad and torch.equal(out.divergence, with_grad[0])


# --- dispatch and validation -------------------------------------------------------------------


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPD_TOPK_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_topk_backend("auto", cpu) == "torch"
    assert resolve_topk_backend("auto", cuda, (torch.bfloat16, torch.float32), 64) == "triton"
    assert resolve_topk_backend("auto", cuda, (torch.float64,)) == "torch"
    assert resolve_topk_backend("auto", cuda, (torch.float32,), kt.MAX_K + 1) == "torch"
    assert resolve_topk_backend("triton", cpu) == "triton"
    monkeypatch.setenv("OPD_TOPK_BACKEND", "torch")
    assert resolve_topk_backend("auto", cuda) == "torch"
    assert resolve_topk_backend("triton", cuda) == "triton"
    with pytest.raises(ValueError):
        resolve_topk_backend("cuda", cpu)
    monkeypatch.setenv("OPD_TOPK_BACKEND", "bogus")
    with pytest.raises(ValueError, match="OPD_TOPK_BACKEND"):
        resolve_topk_backend("auto", cpu)
    monkeypatch.setenv("OPD_TOPK_BACKEND", "triton")
    assert resolve_topk_backend("auto", cpu) == "triton"


def test_torch_backend_is_the_reference() -> None:
    s, t = make_logp(8, 5, seed=8, dtype=torch.float32)
    for beta in BETAS:
        a = topk_divergence(s, t, beta, backend="torch")
        b = reference_topk_divergence(s, t, beta)
        assert torch.equal(a.divergence, b.divergence) and torch.equal(
            a.teacher_tail, b.teacher_tail
        )


@pytest.mark.parametrize("fn", [topk_divergence, reference_topk_divergence])
def test_input_validation_names_the_argument(fn) -> None:
    s, t = torch.zeros(4, 3), torch.zeros(4, 3)
    cases = [
        ((torch.zeros(4), t, 0.0), "student_logp"),
        ((s, torch.zeros(4, 3, 1), 0.0), "teacher_logp"),
        ((s, torch.zeros(4, 2), 0.0), "teacher_logp"),
        ((s, torch.zeros(3, 3), 0.0), "teacher_logp"),
        ((torch.zeros(4, 0), torch.zeros(4, 0), 0.0), "K >= 1"),
        ((s.long(), t, 0.0), "student_logp"),
        ((s, t.long(), 0.0), "teacher_logp"),
        ((s, torch.zeros(4, 3, device="meta"), 0.0), "same device"),
        ((s, t, -0.1), "beta"),
        ((s, t, 1.5), "beta"),
        ((s, t, math.nan), "beta"),
        ((s, t, "0.5"), "beta"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(*args)
    with pytest.raises(ValueError, match="backend"):
        topk_divergence(s, t, 0.0, backend="cuda")  # type: ignore[arg-type]
    if INTERPRETED:
        with pytest.raises(ValueError, match="student_logp dtype"):
            topk_divergence(s.double(), t, 0.0, backend="triton")


@pytest.mark.slow  # a fresh interpreter importing torch: seconds on a busy CPU
def test_import_does_not_import_triton() -> None:
    code = (
        "import sys, torch; from trainer.kernels.topk_divergence import topk_divergence; "
        "topk_divergence(torch.zeros(2, 3) - 2, torch.zeros(2, 3) - 2, 0.5); "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


if not INTERPRETED:  # a CUDA host; on CPU the cases ran in this process

    def test_interpreted_kernel_in_subprocess() -> None:
        run_cpu_cases(__file__)
