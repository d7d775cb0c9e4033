"""The fused LM-head + log-softmax kernel against its torch reference and full logits.

As in ``tests/test_kernel.py``: without a GPU the Triton kernels run through Triton's
interpreter (``tests/conftest.py`` imports them with ``TRITON_INTERPRET=1``); on a GPU host they
are tested compiled on CUDA tensors and ``test_interpreted_kernel_in_subprocess`` runs the CPU
cases in a fresh interpreter-mode process. Shapes are tiny and deliberately ragged: with the
test tiles ``BLOCK_N, BLOCK_V, BLOCK_H = 16, 32, 16``, ``N = 37``, ``V = 75``, ``H = 40`` are
multiples of none of them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.interpreted_kernels import DEVICES, kernel_device, run_cpu_cases
from trainer.kernels import (
    ChunkedLinearLogprob,
    linear_logprob,
    resolve_logprob_backend,
)
from trainer.kernels import linear_logprob_triton as kt

INTERPRETED = kt.interpreted()
BLOCKS = kt.Blocks(n=16, v=32, h=16, num_warps=4)
N, V, H = 37, 75, 40


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device to test on; CPU runs the kernel in Triton's interpreter."""
    return kernel_device(request, monkeypatch, interpreted=INTERPRETED, backend_env="OPD_LOGPROB_BACKEND")


def make_inputs(
    n: int,
    v: int,
    h: int,
    k: int,
    *,
    seed: int,
    device: str,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Random inputs with peaked rows: k ids repeat and include the sampled id."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    k_ids = torch.randint(0, v, (n, k), generator=g)
    if k >= 3:
        k_ids[:, 0] = y  # the sampled id among the top-k
        k_ids[::2, 2] = k_ids[::2, 1]  # repeats
    return {
        "hidden": hid.to(device, dtype),
        "weight": w.to(device, dtype),
        "bias": b.to(device, dtype) if b is not None else None,
        "targets": y.to(device),
        "k_ids": k_ids.to(device),
    }


def upstream(n: int, k: int, device: str, seed: int = 99) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(device) for s in ((n,), (n,), (n, k)))


def run_fused(
    inp: dict, temperature: float, backend: str, grads: tuple[torch.Tensor, ...], **kw: object
) -> list[torch.Tensor]:
    """Outputs and ``(grad_h, grad_W, grad_b)`` of ``sum g . outputs`` through linear_logprob."""
    leaves = {
        name: t.detach().clone().requires_grad_() if t is not None and name != "targets"
        and name != "k_ids" else t
        for name, t in inp.items()
    }  # fmt: skip
    out = linear_logprob(
        leaves["hidden"],
        leaves["weight"],
        leaves["targets"],
        temperature,
        bias=leaves["bias"],
        k_ids=leaves["k_ids"],
        backend=backend,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    assert out.k_logp is not None
    loss = (out.logp * grads[0]).sum() + (out.lse * grads[1]).sum() + (out.k_logp * grads[2]).sum()
    loss.backward()
    res = [out.logp.detach(), out.lse.detach(), out.k_logp.detach()]
    res += [leaves["hidden"].grad, leaves["weight"].grad]
    res += [leaves["bias"].grad if leaves["bias"] is not None else None]
    return res


def run_full(inp: dict, temperature: float, grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The same through plain full ``[N, V]`` float32 logits (from the same input values)."""
    hid = inp["hidden"].detach().float().requires_grad_()
    w = inp["weight"].detach().float().requires_grad_()
    b = inp["bias"].detach().float().requires_grad_() if inp["bias"] is not None else None
    logits = hid @ w.T + (b if b is not None else 0.0)
    logprobs = torch.log_softmax(logits / temperature, -1)
    logp = logprobs.gather(1, inp["targets"][:, None]).squeeze(1)
    lse = torch.logsumexp(logits / temperature, -1)
    k_logp = logprobs.gather(1, inp["k_ids"])
    ((logp * grads[0]).sum() + (lse * grads[1]).sum() + (k_logp * grads[2]).sum()).backward()
    return [logp.detach(), lse.detach(), k_logp.detach(), hid.grad, w.grad,
            b.grad if b is not None else None]  # fmt: skip


NAMES = ["logp", "lse", "k_logp", "grad_h", "grad_W", "grad_b"]


def assert_all_close(
    got: list, want: list, rtol: float, atol: float, what: str, names: list[str] = NAMES
) -> None:
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g is not None and torch.isfinite(g).all(), f"{what}: {name}"
        torch.testing.assert_close(
            g.float(), w.float(), rtol=rtol, atol=atol, msg=f"{what}: {name}"
        )


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "k", "bias", "temperature"),
    [
        (torch.float32, 3, True, 0.7),
        (torch.float32, 0, False, 1.0),
        (torch.bfloat16, 3, True, 0.7),
        (torch.bfloat16, 0, False, 1.3),
    ],
)
def test_kernel_matches_full_logits_and_reference(
    device: str, dtype: torch.dtype, k: int, bias: bool, temperature: float
) -> None:
    inp = make_inputs(N, V, H, k, seed=k * 10 + int(bias), device=device, dtype=dtype, bias=bias)
    grads = upstream(N, k, device)
    fused = run_fused(inp, temperature, "triton", grads, blocks=BLOCKS)
    ref = run_fused(inp, temperature, "torch", grads, chunk_tokens=16)
    full = run_full(inp, temperature, grads)
    for t in fused[:3]:
        assert t.dtype == torch.float32 and t.device.type == device
    for t, src in zip(fused[3:], (inp["hidden"], inp["weight"], inp["bias"]), strict=True):
        assert (t is None) == (src is None) and (t is None or t.dtype == dtype)
    if dtype == torch.float32:
        assert_all_close(fused, full, 1e-5, 1e-5, "kernel vs full logits")
        assert_all_close(fused, ref, 1e-5, 1e-5, "kernel vs reference")
        assert_all_close(ref, full, 1e-5, 1e-5, "reference vs full logits")
    else:
        # The kernel keeps float32 logits from the bf16 inputs: the forward matches full fp32
        # logits of the same values up to summation order; the gradients carry the bf16
        # rounding of d/dlogits (before the tl.dot) and of the bf16 grad_h / grad_W outputs.
        assert_all_close(fused[:3], full[:3], 1e-5, 1e-5, "kernel vs full", NAMES[:3])
        assert_all_close(fused[3:], full[3:], 2e-2, 2e-2, "kernel vs full", NAMES[3:])
        # The reference rounds the logits to bf16 (F.linear in bf16), as the chunked torch path always has.
        assert_all_close(fused, ref, 5e-2, 5e-2, "kernel vs reference")
        assert_all_close(ref, full, 5e-2, 5e-2, "reference vs full logits")


def test_kernel_default_blocks_and_tiny_shapes(device: str) -> None:
    # The GPU default tiles (64 x 128 x 64) with shapes smaller than one tile, and N = 1.
    for n, v, h in ((5, 50, 24), (1, 17, 16)):
        inp = make_inputs(n, v, h, 2, seed=n, device=device)
        grads = upstream(n, 2, device)
        fused = run_fused(inp, 0.9, "triton", grads)
        assert_all_close(fused, run_full(inp, 0.9, grads), 1e-5, 1e-5, f"{n}x{v}x{h}")


def test_kernel_partial_outputs_and_k_none(device: str) -> None:
    # Only logp used (lse and k_logp get no gradient), then only lse; no k_ids at all.
    inp = make_inputs(N, V, H, 0, seed=5, device=device)
    hid = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    for pick in ("logp", "lse"):
        grads = []
        for backend in ("triton", "torch"):
            hid.grad = w.grad = None
            out = linear_logprob(
                hid, w, inp["targets"], 1.0, backend=backend, blocks=BLOCKS, chunk_tokens=16
            )
            assert out.k_logp is None
            getattr(out, pick).sum().backward()
            grads.append((hid.grad.clone(), w.grad.clone()))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # d sum(lse) / d logits = softmax (rows sum to 1) and d sum(logp) = onehot - softmax.
    out = linear_logprob(hid.detach(), w.detach(), inp["targets"], 1.0, backend="triton",
                         blocks=BLOCKS)  # fmt: skip
    assert (out.logp <= 1e-6).all()


def test_kernel_weight_only_and_frozen_weight(device: str) -> None:
    inp = make_inputs(N, V, H, 3, seed=6, device=device)
    for need_h, need_w in ((False, True), (True, False)):
        hid = inp["hidden"].clone().requires_grad_(need_h)
        w = inp["weight"].clone().requires_grad_(need_w)
        got = []
        for backend in ("triton", "torch"):
            out = linear_logprob(hid, w, inp["targets"], 0.8, k_ids=inp["k_ids"],
                                 backend=backend, blocks=BLOCKS)  # fmt: skip
            assert out.k_logp is not None
            leaf = hid if need_h else w
            (g,) = torch.autograd.grad(out.logp.sum() + out.k_logp.sum(), leaf)
            got.append(g)
        torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)


def test_kernel_is_deterministic(device: str) -> None:
    inp = make_inputs(N, V, H, 3, seed=7, device=device)
    grads = upstream(N, 3, device)
    a = run_fused(inp, 0.7, "triton", grads, blocks=BLOCKS)
    b = run_fused(inp, 0.7, "triton", grads, blocks=BLOCKS)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_kernel_mixed_dtypes_under_autocast(device: str) -> None:
    # bf16 hidden states from an autocast body, float32 master weights: the projection runs in
    # bf16 on both paths (the kernel casts each tile), gradients come back in the leaf dtypes.
    inp = make_inputs(N, V, H, 3, seed=8, device=device)
    inp["hidden"] = inp["hidden"].to(torch.bfloat16)
    grads = upstream(N, 3, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        fused = run_fused(inp, 0.7, "triton", grads, blocks=BLOCKS)
        ref = run_fused(inp, 0.7, "torch", grads, chunk_tokens=16)
    assert fused[3].dtype == torch.bfloat16 and fused[4].dtype == torch.float32
    assert_all_close(fused, ref, 5e-2, 5e-2, "kernel vs reference under autocast")


def test_kernel_never_allocates_n_by_v(device: str) -> None:
    # A [N, V] float tensor (>= 2 bytes an element) is larger than every legitimate one
    # ([N, H], [V, H] float32, [N, K]): record every tensor an aten op creates during forward +
    # backward (which includes the interpreter's byte copies of the arguments) and every tensor
    # saved for the backward, and check that none has an [N, V] shape or N * V * 2 bytes.
    n, v, h, k = 48, 96, 16, 3
    inp = make_inputs(n, v, h, k, seed=9, device=device)
    grads = upstream(n, k, device)

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.made: list[tuple[tuple[int, ...], int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.made.append((tuple(t.shape), t.numel() * t.element_size()))
            return out

    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    for backend, expect_big in (("triton", False), ("torch", True)):
        rec = Record()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rec:
            run_fused(inp, 0.7, backend, grads, blocks=BLOCKS, chunk_tokens=n)
        # saved for backward: the inputs and [N] / [N, K] tensors only
        assert saved and all(v not in s or s in ((v, h), (v,)) for s in saved), saved
        big = [(s, b) for s, b in rec.made if b >= n * v * 2 or (n in s and v in s)]
        # the torch path with chunk = N does build [N, V] chunk logits: the check can see them
        assert bool(big) == expect_big, (backend, big, sorted(set(rec.made)))


def test_reference_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(3)
    n, v, h = 5, 7, 3
    hid = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    k_ids = torch.randint(0, v, (n, 3), generator=g)
    k_ids[:, 0] = y
    k_ids[0, 2] = k_ids[0, 1]

    def f(hid: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ChunkedLinearLogprob.apply(hid, w, b, y, k_ids, 1 / 0.7, 2, torch.float64)

    assert torch.autograd.gradcheck(f, (hid, w, b))


def test_policy_entry_point_is_the_reference() -> None:
    # trainer.policy's entry point is the same torch path, gradients included, bit for bit.
    from trainer.policy import chunked_token_logprobs

    inp = make_inputs(N, V, H, 0, seed=11, device="cpu")
    hid = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    b = inp["bias"].clone().requires_grad_()  # type: ignore[union-attr]
    got = []
    for fn in ("policy", "reference"):
        hid.grad = w.grad = b.grad = None
        if fn == "policy":
            logp = chunked_token_logprobs(hid, w, b, inp["targets"], 0.7, 16)
        else:
            logp = linear_logprob(hid, w, inp["targets"], 0.7, bias=b, backend="torch",
                                  chunk_tokens=16).logp  # fmt: skip
        logp.sum().backward()
        got.append([logp.detach(), hid.grad.clone(), w.grad.clone(), b.grad.clone()])
    for x, y in zip(*got, strict=True):
        assert torch.equal(x, y)


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPD_LOGPROB_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_logprob_backend("auto", cpu) == "torch"
    assert resolve_logprob_backend("auto", cuda, (torch.bfloat16, torch.float32)) == "triton"
    assert resolve_logprob_backend("auto", cuda, (torch.float64,)) == "torch"
    assert resolve_logprob_backend("triton", cpu) == "triton"
    monkeypatch.setenv("OPD_LOGPROB_BACKEND", "torch")
    assert resolve_logprob_backend("auto", cuda) == "torch"
    assert resolve_logprob_backend("triton", cuda) == "triton"
    with pytest.raises(ValueError):
        resolve_logprob_backend("cuda", cpu)
    monkeypatch.setenv("OPD_LOGPROB_BACKEND", "bogus")
    with pytest.raises(ValueError):
        resolve_logprob_backend("auto", cpu)


def test_shape_errors() -> None:
    h, w, y = torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError):
        linear_logprob(h, torch.zeros(10, 7), y, backend="torch")
    with pytest.raises(ValueError):
        linear_logprob(h, w, y[:3], backend="torch")
    with pytest.raises(ValueError):
        linear_logprob(h, w, y, k_ids=torch.zeros(3, 2, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError):
        linear_logprob(h, w, y, bias=torch.zeros(9), backend="torch")
    if INTERPRETED:
        with pytest.raises(ValueError):
            linear_logprob(h.double(), w.double(), y, backend="triton")


if not INTERPRETED:  # a CUDA host; on CPU the cases ran in this process

    def test_interpreted_kernel_in_subprocess() -> None:
        run_cpu_cases(__file__)
