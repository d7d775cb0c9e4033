"""What the kernel benchmarks (bench/kernels.py) share: sizes, dtypes, timing, the table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_size(text: str) -> int:
    """``64k`` -> 65536, ``8M`` -> 8388608, ``1000`` -> 1000."""
    text = text.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAT = statistics.median  # replaced by min with --stat min (use_stat)


def use_stat(name: str) -> None:
    """``--stat``: ``min`` makes :func:`time_ms` report the best run, else the median."""
    global STAT
    STAT = min if name == "min" else statistics.median


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


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU threads torch uses: the head of every table."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    """The rows as a markdown table (``--markdown``, for docs), else only the column names:
    plain rows are printed as they are measured."""
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print("# columns: " + ", ".join(header))
