"""Fused LM-head + log-softmax: forward + backward of sum(logp_y) for h [N, H], W [V, H].

Methods (each a full forward + backward giving grad_h and grad_W):
  chunked  trainer.kernels.linear_logprob(..., backend="torch"): the chunked torch path (the
           reference and the CPU path; the chunked semantics trainer.policy uses on CPU), --chunk rows at a time
  triton   linear_logprob(..., backend="triton"): the fused Triton kernels
  liger    Liger-Kernel's LigerFusedLinearCrossEntropyLoss (mean cross-entropy), if installed
  cce      cut_cross_entropy.linear_cross_entropy (mean cross-entropy, its default
           filter_eps="high" gradient filtering), if installed
Liger and CCE compute the mean cross-entropy, i.e. -mean(logp_y), at T = 1: the same matmuls.

Columns: time (median or min of --repeat), peak memory of one forward + backward above the
inputs (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, reset through
/proc/self/clear_refs), speed-up and memory ratio vs chunked measured in this run, and
utilisation: 6 N V H "useful" flops (logits, grad_h, grad_W; the triton kernels execute 10 N V H,
recomputing the logits twice) and 3 (N + V) H element bytes (read h and W twice, write both
grads) over the time, against the device's vendor peak (dense, no sparsity) from a small table
(or --peak-tflops / --peak-gbps).

On CPU Triton runs only through its interpreter (TRITON_INTERPRET=1): such "triton" times are
the interpreter's, not a kernel's, and must not be quoted; liger and cce need CUDA.
"""

from __future__ import annotations

import argparse
import ctypes
import os
from collections.abc import Callable

import torch

from bench.kernels_common import (
    DTYPES,
    describe_device,
    parse_size,
    print_table,
    sync,
    time_ms,
    use_stat,
)

#: Vendor datasheet peaks (dense, no sparsity): (bf16/fp16 tensor TFLOP/s, fp32 TFLOP/s, GB/s).
#: Matched in order against torch.cuda.get_device_name.
VENDOR_PEAKS = (
    ("H100 PCIe", (756.0, 51.2, 2000.0)),
    ("H100", (989.4, 66.9, 3350.0)),  # SXM5, HBM3
    ("H200", (989.4, 66.9, 4800.0)),
    ("A100", (312.0, 19.5, 2039.0)),  # SXM4 80GB
)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def backward_step(loss_fn: LossFn) -> Callable[..., Callable[[], torch.Tensor]]:
    """`make(h, w, y)` -> one timed step: clear the grads, `loss_fn(h, w, y)`, backward.

    Every method is timed through this, so each pays the same bookkeeping around its kernel."""

    def make(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            h.grad = w.grad = None
            loss = loss_fn(h, w, y)
            loss.backward()
            return loss.detach()

        return step

    return make


def vendor_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, float | None, str]:
    """(TFLOP/s, GB/s, source) of the device for dtype; None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None, None, "no table entry for CPU"
    name = torch.cuda.get_device_name(device)
    for key, (tensor_tf, fp32_tf, gbps) in VENDOR_PEAKS:
        if key in name:
            tf = fp32_tf if dtype == torch.float32 else tensor_tf
            return tf, gbps, f"vendor peak for {key} ({name})"
    return None, None, f"no table entry for {name}"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` above what was allocated before it (MiB)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        # Hand freed heap pages back to the OS first (glibc), or a re-run reuses them unseen;
        # then (Linux) writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - base) / 1024
    except (OSError, AttributeError):
        return None


def _linear_logprob_methods(
    args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Callable[..., Callable[[], torch.Tensor]]], list[str]]:
    """Factories ``make(h, w, y) -> step`` (one forward + backward, returns the loss) per
    runnable method, and notes about the methods skipped."""
    from trainer.kernels import linear_logprob

    notes: list[str] = []
    methods: dict[str, Callable[..., Callable[[], torch.Tensor]]] = {}
    T = args.temperature

    def ours(backend: str) -> Callable[..., Callable[[], torch.Tensor]]:
        def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = linear_logprob(h, w, y, T, backend=backend, chunk_tokens=args.chunk)  # type: ignore[arg-type]
            return -out.logp.mean()

        return backward_step(loss)

    wanted = args.methods.split(",")
    if "chunked" in wanted:
        methods["chunked"] = ours("torch")
    if "triton" in wanted:
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            methods["triton"] = ours("triton")
            if device.type != "cuda":
                notes.append("triton: Triton's *interpreter* on CPU, not a kernel: do not quote")
        else:
            notes.append("triton: skipped (needs CUDA; TRITON_INTERPRET=1 runs the interpreter)")
    if "liger" in wanted:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:  # noqa: BLE001 -- any import failure means "not available"
            notes.append(f"liger: skipped (not importable: {type(exc).__name__}: {exc})")
        else:
            if device.type != "cuda":
                notes.append("liger: skipped (its Triton kernels need CUDA)")
            else:
                liger = LigerFusedLinearCrossEntropyLoss()
                methods["liger"] = backward_step(lambda h, w, y: liger(w, h, y))
    if "cce" in wanted:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            notes.append(f"cce: skipped (not importable: {type(exc).__name__}: {exc})")
        else:
            if device.type != "cuda":
                notes.append("cce: skipped (its Triton kernels need CUDA)")
            else:
                methods["cce"] = backward_step(linear_cross_entropy)
    if T != 1.0 and ({"liger", "cce"} & set(methods)):
        notes.append(f"liger/cce run at T = 1 (no temperature argument); ours at T = {T}")
    return methods, notes


def linear_logprob_main(argv: list[str] | None = None) -> int:
    """Benchmark the fused LM-head + log-softmax kernel; print one table."""
    p = argparse.ArgumentParser(
        prog="bench/kernels.py linear-logprob",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", default=None, help="token counts N, e.g. 8k,16k,32k,64k")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 151936 on CUDA)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 1536 on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="of h and W")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the chunked path")
    p.add_argument("--methods", default="chunked,triton,liger,cce")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--stat", choices=["median", "min"], default="median")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    use_stat(args.stat)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    ns = [parse_size(x) for x in (args.n or ("8k,16k,32k,64k" if on_gpu else "1k")).split(",")]
    v = args.v or (151936 if on_gpu else 4096)
    hd = args.h or (1536 if on_gpu else 256)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    tflops_peak, gbps_peak, peak_src = vendor_peak(device, dtype)
    tflops_peak = args.peak_tflops or tflops_peak
    gbps_peak = args.peak_gbps or gbps_peak
    if args.peak_tflops or args.peak_gbps:
        peak_src = "--peak-tflops/--peak-gbps"
    methods, notes = _linear_logprob_methods(args, device)

    desc = describe_device(device)
    print(f"# device: {desc}; torch {torch.__version__}; dtype {dtype}; V = {v}; H = {hd}; "
          f"T = {args.temperature}; chunk = {args.chunk}")  # fmt: skip
    print(f"# {args.stat} of {args.repeat} runs after {args.warmup} warm-up; methods: "
          f"{', '.join(methods) or 'none'}")  # fmt: skip
    if tflops_peak:
        print(f"# peaks: {tflops_peak} TFLOP/s, {gbps_peak} GB/s ({peak_src}; vendor datasheet)")
    else:
        print(f"# peaks: unknown ({peak_src}): no utilisation columns")
    for note in notes:
        print(f"# {note}")

    header = ["N", "method", "ms", "peak MiB", "speed-up vs chunked", "memory vs chunked",
              "TFLOP/s", "%peak flops", "GB/s", "%peak bw", "loss", "loss diff vs chunked"]  # fmt: skip
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in ns:
        h = (torch.randn(n, hd, generator=g) * 1.0).to(device, dtype).requires_grad_()
        w = (torch.randn(v, hd, generator=g) * hd**-0.5).to(device, dtype).requires_grad_()
        y = torch.randint(0, v, (n,), generator=g).to(device)
        results: dict[str, dict[str, float]] = {}
        for name, make in methods.items():
            step = make(h, w, y)
            try:
                loss = float(step())
                ms = time_ms(step, device, args.warmup, args.repeat)
                mib = peak_memory_mib(step, device)
            except Exception as exc:  # noqa: BLE001 -- report and go on with the others
                print(f"# {name} at N = {n}: failed ({type(exc).__name__}: {exc})", flush=True)
                continue
            finally:
                h.grad = w.grad = None
            results[name] = {"ms": ms, "mib": mib if mib is not None else float("nan"),
                             "loss": loss}  # fmt: skip
        base = results.get("chunked")
        flops = 6 * n * v * hd
        nbytes = 3 * (n + v) * hd * h.element_size()
        for name, r in results.items():
            tf = flops / (r["ms"] * 1e-3) / 1e12
            gb = nbytes / (r["ms"] * 1e-3) / 1e9
            rows.append([
                f"{n:,}", name, f"{r['ms']:.2f}", f"{r['mib']:.0f}",
                f"{base['ms'] / r['ms']:.2f}x" if base else "-",
                f"{r['mib'] / base['mib']:.2f}" if base and base["mib"] > 0 else "-",
                f"{tf:.3g}", f"{100 * tf / tflops_peak:.1f}%" if tflops_peak else "-",
                f"{gb:.3g}", f"{100 * gb / gbps_peak:.2f}%" if gbps_peak else "-",
                f"{r['loss']:.5f}", f"{abs(r['loss'] - base['loss']):.2e}" if base else "-",
            ])  # fmt: skip
            if not args.markdown:
                print("  ".join(rows[-1]), flush=True)
        del h, w, y
        if on_gpu:
            torch.cuda.empty_cache()
    print_table(header, rows, args.markdown)
    return 0
