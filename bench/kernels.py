"""Benchmarks of the trainer's fused kernels.

``python bench/kernels.py [opd-loss] ...``: the fused OPD loss (below).
``python bench/kernels.py linear-logprob ...``: the fused LM-head + log-softmax kernel against
the chunked torch path, Liger-Kernel and Cut Cross-Entropy (see ``linear_logprob_main``).

Fused OPD loss kernel vs the eager torch reference vs torch.compile of it.

Each method computes the loss, its metric sums and ``d loss / d logp`` (forward + backward) for
``tokens = B * T`` tokens. Usage::

    python bench/kernels.py                          # CUDA if present, else CPU (small sizes)
    python bench/kernels.py --device cuda --sizes 64k,256k,1M,4M,8M --dtype bf16
    python bench/kernels.py --device cpu --sizes 64k,256k --no-compile

Columns: median (``--stat min``: best) wall time per forward+backward (ms); effective bandwidth = the bytes the fused
pass must move (read ``logp``, ``s``, ``tau``, ``mask``; write ``grad``) divided by the time, the
same numerator for every method so the GB/s compare like the times; for the fused kernel alone
(forward launch, which is the one pass over memory) also the fraction of the device's peak
bandwidth; and the time ratios fused/eager and fused/compiled (< 1: the fused kernel is faster).

Peak bandwidth: ``--peak-gbps``, else 3350 GB/s on an H100 (SXM HBM3), 4800 GB/s on an H200,
else measured with a large device copy (on CPU that measures what one process actually gets,
typically 5-20 GB/s per socket on small VMs, far below the DRAM datasheet figure).

Triton does not compile for CPU: on CPU the fused kernel only runs with ``TRITON_INTERPRET=1``
(Triton's Python interpreter), and its times then measure the interpreter, not the kernel. They
are printed with that warning and should never be quoted.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Run as a script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.algorithms import LossConfig, reference_loss  # noqa: E402
from trainer.kernels import opd_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KNOWN_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


def parse_size(text: str) -> int:
    """``64k`` -> 65536, ``8M`` -> 8388608, ``1000`` -> 1000."""
    text = text.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAT = statistics.median  # replaced by min with --stat min


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median (or, with ``--stat min``, best) wall time of ``fn`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return STAT(samples)


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> tuple[float, str]:
    """The device's peak memory bandwidth (GB/s) and where the number comes from."""
    if override:
        return override, "--peak-gbps"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_GBPS.items():
            if key in name:
                return value, f"datasheet ({name})"
    # Measure: copy a buffer much larger than the caches; a copy reads and writes it once.
    n = (256 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, repeat=5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9, "measured (256 MiB copy)"


@dataclass
class Batch:
    logp: torch.Tensor
    s: torch.Tensor
    tau: torch.Tensor
    mask: torch.Tensor

    def fused_pass_bytes(self) -> int:
        """Bytes the one fused pass must move: read logp, s, tau, mask; write the gradient."""
        reads = sum(t.numel() * t.element_size() for t in (self.logp, self.s, self.tau, self.mask))
        return reads + self.logp.numel() * self.logp.element_size()


def make_batch(tokens: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> Batch:
    """A synthetic batch shaped like a rollout: ragged response masks, ratios near 1."""
    g = torch.Generator().manual_seed(0)
    b = max(tokens // seq_len, 1)
    s = -torch.rand(b, seq_len, generator=g) * 4
    logp = s + torch.randn(b, seq_len, generator=g) * 0.3
    tau = s + torch.randn(b, seq_len, generator=g)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (b,), generator=g)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    return Batch(logp.to(device, dtype), s.to(device, dtype), tau.to(device), mask.to(device))


def bench_size(
    batch: Batch, cfg: LossConfig, args: argparse.Namespace, methods: list[str]
) -> dict[str, float]:
    """Median forward+backward time (ms) of every method, plus the bare kernel launch."""
    device = batch.logp.device
    x = batch.logp.detach().clone().requires_grad_()
    out: dict[str, float] = {}

    def eager() -> None:
        x.grad = None
        reference_loss(x, batch.s, batch.tau, batch.mask, cfg)[0].backward()

    def fused() -> None:
        x.grad = None
        opd_loss(x, batch.s, batch.tau, batch.mask, cfg, backend="triton")[0].backward()

    if "eager" in methods:
        out["eager"] = time_ms(eager, device, args.warmup, args.repeat)
    if "compiled" in methods:
        compiled_ref = torch.compile(reference_loss, dynamic=False)

        def compiled() -> None:
            x.grad = None
            compiled_ref(x, batch.s, batch.tau, batch.mask, cfg)[0].backward()

        t0 = time.perf_counter()
        compiled()  # compile outside the timing
        sync(device)
        out["compile_s"] = time.perf_counter() - t0
        out["compiled"] = time_ms(compiled, device, args.warmup, args.repeat)
    if "fused" in methods:
        from trainer.kernels.opd_loss import launch_kernel, row_weights

        out["fused"] = time_ms(fused, device, args.warmup, args.repeat)
        row_w = row_weights(batch.mask.sum(-1, dtype=torch.float32), cfg.aggregation)

        def kernel_only() -> None:
            launch_kernel(x.detach(), batch.s, batch.tau, batch.mask, row_w, cfg)

        out["kernel"] = time_ms(kernel_only, device, args.warmup, args.repeat)
    return out


def opd_loss_main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every size, print one table (``--markdown`` for docs)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="token counts, e.g. 64k,256k,1M,8M")
    p.add_argument("--seq-len", type=int, default=1024, help="T; B = tokens // T")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of logp and s")
    p.add_argument("--algorithm", choices=["on_policy_distill", "jsd"], default="jsd")
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="min: best of the repeats, the better estimate on a shared, busy machine",
    )
    args = p.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    default_sizes = "64k,256k,1M,4M,8M" if on_gpu else "64k,256k,1M"
    sizes = [parse_size(s) for s in (args.sizes or default_sizes).split(",")]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    methods = ["eager"] + ([] if args.no_compile else ["compiled"])
    if on_gpu or interpreted:
        methods.append("fused")
    cfg = LossConfig(algorithm=args.algorithm)
    peak, peak_src = peak_bandwidth_gbps(device, args.peak_gbps)

    desc = (
        torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"# device: {desc}; torch {torch.__version__}; dtype {args.dtype}; {cfg.algorithm}/ppo")
    print(f"# T = {args.seq_len}; {args.stat} of {args.repeat} runs after {args.warmup} warm-up")
    print(f"# peak bandwidth: {peak:.1f} GB/s ({peak_src})")
    if "fused" not in methods:
        print("# fused: skipped (Triton compiles only for GPUs; TRITON_INTERPRET=1 runs it here")
        print("#        through the interpreter, whose times are meaningless)")
    elif not on_gpu:
        print("# WARNING: fused times below are Triton's *interpreter*, not a kernel: do not quote")

    header = ["tokens", "eager ms", "compiled ms", "fused ms", "kernel ms", "eager GB/s",
              "compiled GB/s", "fused GB/s", "kernel GB/s", "kernel %peak", "fused/eager",
              "fused/compiled", "compile s"]  # fmt: skip
    rows = []
    for n in sizes:
        batch = make_batch(n, args.seq_len, DTYPES[args.dtype], device)
        r = bench_size(batch, cfg, args, methods)
        nbytes = batch.fused_pass_bytes()

        def gbps(key: str, r: dict[str, float] = r, nbytes: int = nbytes) -> str:
            return f"{nbytes / (r[key] * 1e-3) / 1e9:.3g}" if key in r else "-"

        def ms(key: str, r: dict[str, float] = r) -> str:
            return f"{r[key]:.3f}" if key in r else "-"

        def ratio(a: str, b: str, r: dict[str, float] = r) -> str:
            return f"{r[a] / r[b]:.3f}" if a in r and b in r else "-"

        kernel_pct = f"{100 * float(gbps('kernel')) / peak:.1f}%" if "kernel" in r else "-"
        rows.append([f"{batch.logp.numel():,}", ms("eager"), ms("compiled"), ms("fused"),
                     ms("kernel"), gbps("eager"), gbps("compiled"), gbps("fused"),
                     gbps("kernel"), kernel_pct, ratio("fused", "eager"),
                     ratio("fused", "compiled"),
                     f"{r['compile_s']:.1f}" if "compile_s" in r else "-"])  # fmt: skip
        del batch
        if not args.markdown:
            print("  ".join(rows[-1]), flush=True)

    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print("# columns: " + ", ".join(header))
    return 0


# ------------------------------------------------------------------ linear-logprob benchmark

LINEAR_LOGPROB_DOC = """Fused LM-head + log-softmax: forward + backward of sum(logp_y) for h [N, H], W [V, H].

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

#: Vendor datasheet peaks (dense, no sparsity): (bf16/fp16 tensor TFLOP/s, fp32 TFLOP/s, GB/s).
#: Matched in order against torch.cuda.get_device_name.
VENDOR_PEAKS = (
    ("H100 PCIe", (756.0, 51.2, 2000.0)),
    ("H100", (989.4, 66.9, 3350.0)),  # SXM5, HBM3
    ("H200", (989.4, 66.9, 4800.0)),
    ("A100", (312.0, 19.5, 2039.0)),  # SXM4 80GB
)


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
        def make(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
            def step() -> torch.Tensor:
                h.grad = w.grad = None
                out = linear_logprob(h, w, y, T, backend=backend, chunk_tokens=args.chunk)  # type: ignore[arg-type]
                loss = -out.logp.mean()
                loss.backward()
                return loss.detach()

            return step

        return make

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

                def make_liger(
                    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor
                ) -> Callable[[], torch.Tensor]:
                    def step() -> torch.Tensor:
                        h.grad = w.grad = None
                        loss = liger(w, h, y)
                        loss.backward()
                        return loss.detach()

                    return step

                methods["liger"] = make_liger
    if "cce" in wanted:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            notes.append(f"cce: skipped (not importable: {type(exc).__name__}: {exc})")
        else:
            if device.type != "cuda":
                notes.append("cce: skipped (its Triton kernels need CUDA)")
            else:

                def make_cce(
                    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor
                ) -> Callable[[], torch.Tensor]:
                    def step() -> torch.Tensor:
                        h.grad = w.grad = None
                        loss = linear_cross_entropy(h, w, y)
                        loss.backward()
                        return loss.detach()

                    return step

                methods["cce"] = make_cce
    if T != 1.0 and ({"liger", "cce"} & set(methods)):
        notes.append(f"liger/cce run at T = 1 (no temperature argument); ours at T = {T}")
    return methods, notes


def linear_logprob_main(argv: list[str] | None = None) -> int:
    """Benchmark the fused LM-head + log-softmax kernel; print one table."""
    p = argparse.ArgumentParser(
        prog="bench/kernels.py linear-logprob",
        description=LINEAR_LOGPROB_DOC,
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
    global STAT
    STAT = min if args.stat == "min" else statistics.median

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

    desc = (
        torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    )
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
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print("# columns: " + ", ".join(header))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``[opd-loss] ARGS`` (the default) or ``linear-logprob ARGS``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "linear-logprob":
        return linear_logprob_main(argv[1:])
    if argv and argv[0] == "opd-loss":
        argv = argv[1:]
    return opd_loss_main(argv)


if __name__ == "__main__":
    sys.exit(main())
