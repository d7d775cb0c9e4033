"""Mutation check of the OPD/JSD math: each mutation must make a test fail.

Flips one sign or branch at a time in the fused Triton kernel (run through Triton's
interpreter) and in the torch reference, runs the tests that pin them, and reports whether
the tests caught it. The source is always restored, also on Ctrl-C.

    .venv/bin/python scripts/mutation_check.py          # ~2 minutes on 2 cores

Exit status 1 when a mutation survives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "trainer/kernels/opd_loss_triton.py"
REFERENCE = "trainer/algorithms.py"

#: (name, file, original text, mutated text, tests that must catch it)
MUTATIONS: list[tuple[str, str, str, str, str]] = [
    (
        "kernel: jsd b=0 sign",
        KERNEL,
        "        j = s - tau\n",
        "        j = tau - s\n",
        "tests/test_kernel.py",
    ),
    (
        "kernel: jsd b=1 sign",
        KERNEL,
        "        j = tau - s\n",
        "        j = s - tau\n",
        "tests/test_kernel.py",
    ),
    ("kernel: jsd log b", KERNEL, "x2 = tau + log_b", "x2 = tau + log_1mb", "tests/test_kernel.py"),
    ("kernel: jsd interior", KERNEL, "j = s - log_m", "j = tau - log_m", "tests/test_kernel.py"),
    (
        "kernel: opd advantage",
        KERNEL,
        "kl_coef * (tau - s)",
        "kl_coef * (s - tau)",
        "tests/test_kernel.py",
    ),
    (
        "kernel: jsd advantage",
        KERNEL,
        "adv = -kl_coef * j",
        "adv = kl_coef * j",
        "tests/test_kernel.py",
    ),
    (
        "kernel: ppo clip branch",
        KERNEL,
        "clipped = pg2 > pg1",
        "clipped = pg2 < pg1",
        "tests/test_kernel.py",
    ),
    (
        "kernel: dual clip",
        KERNEL,
        "dual = (adv < 0.0)",
        "dual = (adv > 0.0)",
        "tests/test_kernel.py",
    ),
    (
        "kernel: gradient sign",
        KERNEL,
        "(w * neg_adv) * ratio",
        "(w * adv) * ratio",
        "tests/test_kernel.py",
    ),
    (
        "kernel: kl metric",
        KERNEL,
        "tl.where(m, s - tau, 0.0)",
        "tl.where(m, tau - s, 0.0)",
        "tests/test_kernel.py",
    ),
    (
        "reference: jsd b=0",
        REFERENCE,
        "        return s - tau\n",
        "        return tau - s\n",
        "tests/test_algorithms.py",
    ),
    (
        "reference: jsd interior",
        REFERENCE,
        "    return s - log_m\n",
        "    return tau - log_m\n",
        "tests/test_algorithms.py",
    ),
    (
        "reference: opd advantage",
        REFERENCE,
        "cfg.kl_coef * (tau - s)",
        "cfg.kl_coef * (s - tau)",
        "tests/test_algorithms.py",
    ),
]


def run_one(file: Path, original: str, old: str, new: str, tests: str) -> bool:
    """Apply one mutation, run its tests; True when they failed (the mutation was caught)."""
    if original.count(old) != 1:
        raise SystemExit(f"{file}: expected exactly one {old!r}; update MUTATIONS")
    file.write_text(original.replace(old, new))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode != 0


def main() -> int:
    survived = 0
    for name, rel, old, new, tests in MUTATIONS:
        file = ROOT / rel
        original = file.read_text()
        try:
            caught = run_one(file, original, old, new, tests)
        finally:
            file.write_text(original)
        survived += not caught
        print(f"{name:28s} {'caught' if caught else 'SURVIVED'}", flush=True)
    print(f"{len(MUTATIONS) - survived}/{len(MUTATIONS)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
