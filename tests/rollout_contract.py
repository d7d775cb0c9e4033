"""The student rollout service's HTTP contract: the checks every backend must pass.

tests/test_rollout_http.py (hf) and tests/test_rollout_vllm.py (vllm) each run all of them,
in order, on one server (they push weights as they go): first the checks on the initial
weights (tests/rollout_sampling.py), the refusals and OpenAI routes (tests/rollout_requests.py),
then the weight updates (tests/rollout_weights.py), and last the metrics all of them left.
"""

from __future__ import annotations

from tests.rollout_requests import RequestChecks
from tests.rollout_sampling import SamplingChecks
from tests.rollout_weights import WeightsChecks


# pytest runs a class's inherited tests base by base in reverse MRO order, so the bases are
# listed last-to-run first: sampling, then requests, then weights, then test_metrics below.
class RolloutContract(WeightsChecks, RequestChecks, SamplingChecks):
    """All the checks; a backend mixin (tests/backends.py) sets the server and the tolerance."""

    def test_metrics(self, client):
        text = client.get("/metrics").text
        assert 'opd_rollouts_total{service="student_rollout"}' in text
        assert (
            'opd_weight_updates_total{method="load",result="ok",service="student_rollout"}' in text
        )
        assert 'result="rejected"' in text
        version = client.get("/v1/weights").json()["policy_version"]
        assert f'opd_policy_version{{service="student_rollout"}} {float(version)}' in text
        assert 'opd_engine_batch_size_count{op="generate",service="student_rollout"}' in text
        assert 'opd_tokens_generated_total{service="student_rollout"}' in text
