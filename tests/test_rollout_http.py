"""The student rollout service over HTTP, against a real uvicorn subprocess (hf backend).

Every number the service returns is checked against a direct transformers forward of the same
token ids with the weights of the version the service says it used. The tests of
`RolloutContract` (tests/rollout_contract.py) run in order on one server per backend (they
push weights as they go), so the vLLM module (tests/test_rollout_vllm.py) runs the very same
checks.
"""

from __future__ import annotations

from tests.rollout_contract import RolloutContract


class TestRolloutHF(RolloutContract):
    """hf backend (float32 on CPU): logprobs equal the reference forward to 1e-4."""
