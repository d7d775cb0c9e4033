"""Schemathesis against real teacher and rollout processes (hf backend, tiny random models).

For every operation of the served /openapi.json, schema-valid (positive) and schema-breaking
(negative) requests are generated, a bounded number per operation and at most `BUDGET_S` of
wall time per service, and each answer is checked: no 5xx, the status is documented, the
content type is documented, a JSON body matches the documented schema, documented headers
conform. Afterwards the server must still be ready and serve an ordinary request.

The weight routes are fuzzed too: with a weights directory that holds no checkpoint, a random
path or body can only be refused (4xx), never swapped in, so the policy stays at version 0.
Generation is derandomized (the same cases every run) and not shrunk (a failure is reported
as found, which keeps the time bounded).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import checks as st_checks

from tests.servers import ServerHandle, start_server

MAX_EXAMPLES = 40  # per operation and generation mode
BUDGET_S = 60.0  # per service, shared fairly between operations
MAX_MODEL_LEN = 64
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]
# Small limits: generated requests stay cheap on a tiny CPU model.
LIMIT_ARGS = ["--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
              "--max-n", "2", "--max-top-k", "4", "--max-sequences-per-request", "8",
              "--max-tokens-per-request", "512", "--max-body-bytes", "100000",
              "--request-timeout-s", "30", "--no-access-log", "--log-level", "warning"]

# Joining a broadcast group connects to the address the body names: generated bodies would
# send traffic to arbitrary hosts. Its validation is tested in tests/test_broadcast_sync.py.
NOT_FUZZED = frozenset({"/v1/weights/broadcast/init"})

pytestmark = pytest.mark.slow


def fuzz_operation(operation: Any, mode: Any, base_url: str, deadline: float) -> int:
    """Up to MAX_EXAMPLES cases of `operation` in generation `mode`, sent until `deadline`;
    the number sent. Raises the first failed check."""
    from hypothesis import HealthCheck, Phase, given, settings

    sent = 0

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal sent
        if time.monotonic() > deadline:
            return
        sent += 1
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)

    run()
    return sent


def fuzz(server: ServerHandle, budget_s: float = BUDGET_S) -> list[str]:
    """Run the bounded schemathesis pass over every operation; the failures, one line each."""
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    runs = [(op, mode) for op in (result.ok() for result in schema.get_all_operations())
            if op.path not in NOT_FUZZED for mode in schemathesis.GenerationMode]
    end = time.monotonic() + budget_s
    failures: list[str] = []
    total = 0
    for i, (operation, mode) in enumerate(runs):
        label = f"{operation.label} [{mode.value}]"
        # A fair share of what is left: quick operations leave more time to slow ones.
        started = time.monotonic()
        deadline = started + max(0.0, end - started) / (len(runs) - i)
        sent = 0
        try:
            sent = fuzz_operation(operation, mode, server.base_url, deadline)
        except Unsatisfiable:
            pass  # negative mode on an operation without inputs: nothing to break
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{label}: {str(exc)[:1500]}")
        total += sent
        print(f"fuzz: {label}: {sent} requests, {time.monotonic() - started:.1f}s")
    assert total > 0, "no request was sent: " + "; ".join(failures)[:3000]
    return failures


def assert_still_serving(server: ServerHandle, path: str, body: dict[str, Any]) -> None:
    """`/ready` 200 and one ordinary request answered 200 after the fuzzing."""
    assert server.alive(), server.logs()
    assert httpx.get(server.base_url + "/ready", timeout=10).status_code == 200
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def teacher(tiny_models) -> Iterator[ServerHandle]:
    with start_server("services.teacher",
                      ["--model", str(tiny_models["teacher"]), *LIMIT_ARGS]) as server:
        yield server


@pytest.fixture(scope="module")
def rollout(tiny_models, tmp_path_factory) -> Iterator[ServerHandle]:
    weights: Path = tmp_path_factory.mktemp("fuzz-weights")
    with start_server("services.student_rollout",
                      ["--model", str(tiny_models["student"]), "--weights-dir", str(weights),
                       "--max-upload-bytes", "1000000", *LIMIT_ARGS]) as server:
        yield server


def test_fuzz_teacher(teacher: ServerHandle) -> None:
    failures = fuzz(teacher)
    assert not failures, "\n\n".join(failures) + "\n--- server log ---\n" + teacher.logs()
    assert_still_serving(teacher, "/v1/score",
                         {"sequences": [{"token_ids": [1, 2, 3, 4]}], "top_k": 2})


def test_fuzz_rollout(rollout: ServerHandle) -> None:
    failures = fuzz(rollout)
    assert not failures, "\n\n".join(failures) + "\n--- server log ---\n" + rollout.logs()
    assert_still_serving(rollout, "/v1/rollouts",
                         {"prompts": [{"token_ids": [1, 2, 3]}], "n": 2, "max_tokens": 4})
    # Nothing random was accepted as weights.
    status = httpx.get(rollout.base_url + "/v1/weights", timeout=10).json()
    assert status["policy_version"] == 0
