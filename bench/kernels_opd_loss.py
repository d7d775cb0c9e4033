"""Fused OPD loss kernel vs the eager torch reference vs torch.compile of it.

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
import os
import time
from dataclasses import dataclass

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
from trainer.algorithms import LossConfig, reference_loss
from trainer.kernels import opd_loss

KNOWN_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


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


def opd_loss_main(argv: list[str] | None = None, description: str | None = __doc__) -> int:
    """Parse arguments, run every size, print one table (``--markdown`` for docs).
    ``description`` heads ``--help`` (bench/kernels.py puts its own docstring first)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
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
    use_stat(args.stat)

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

    desc = describe_device(device)
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

    print_table(header, rows, args.markdown)
    return 0
