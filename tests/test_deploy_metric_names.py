"""The metric-name helpers and the names themselves: docs/metrics.md, docs/design.md §6, the
code's registrations and vLLM's `vllm:*` names agree (tests/deploy_metric_names.py).
"""

from __future__ import annotations

import pytest

from tests.deploy_metric_names import (
    code_metric_names,
    design_scalars,
    documented_metric_names,
    promql_metric_names,
    step_scalars,
    vllm_metric_names,
)


def test_promql_metric_names() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, service) (rate(opd_request_seconds_bucket"
        '{service=~"$service", route!="/x"}[$__rate_interval]))) / 1e-3 + '
        "max by (job) (vllm:kv_cache_usage_perc) and on (job) up"
    )
    assert promql_metric_names(expr) == {
        "opd_request_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "up",
    }


def test_design_doc_lists_the_scalars_the_trainer_logs() -> None:
    """docs/design.md section 6 and trainer.observability name the same step scalars."""
    assert design_scalars() == list(step_scalars())


def test_documented_names_are_exported_by_the_code() -> None:
    """docs/metrics.md / docs/design.md names and the code's registrations agree."""
    code = code_metric_names()
    documented = documented_metric_names()
    missing = {n for n in documented if not n.endswith("_created")} - code
    assert not missing, f"documented but not exported: {sorted(missing)}"


def test_vllm_kv_cache_metric_name() -> None:
    names = vllm_metric_names()
    if not names:
        pytest.skip("vllm is not installed")
    assert "vllm:kv_cache_usage_perc" in names
    assert {
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:num_requests_waiting",
    } <= names
