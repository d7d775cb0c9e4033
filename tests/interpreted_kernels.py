"""What the Triton kernel tests share: the device each case runs on, and the CPU cases of a
CUDA host rerun in Triton's interpreter.

On a CPU-only host ``tests/conftest.py`` imported triton and the kernels under
``TRITON_INTERPRET=1``, so the CPU cases run in-process; on a CUDA host the kernels are compiled
and the CPU cases run in a fresh interpreter-mode process instead (:func:`run_cpu_cases`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.scripts import REPO_ROOT

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_device(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, *, interpreted: bool,
    backend_env: str,
) -> str:
    """The body of a ``device`` fixture: CPU runs the kernel in Triton's interpreter."""
    if request.param == "cpu":
        if not interpreted:
            pytest.skip("CUDA host: CPU cases run in test_interpreted_kernel_in_subprocess")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(backend_env, raising=False)
    return str(request.param)


def run_cpu_cases(test_file: str) -> None:
    """Run ``test_file``'s CPU cases in a fresh ``TRITON_INTERPRET=1`` process; assert they pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "cpu"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
