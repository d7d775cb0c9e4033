"""The Helm chart's manifests and values are valid, offline.

Every rendered manifest is validated against the Kubernetes OpenAPI schemas by
`kubernetes-validate` (strict: unknown fields fail) for the oldest Kubernetes the chart supports
(Chart.yaml kubeVersion, 1.28) and the newest schema shipped; the ServiceMonitor (a CRD) is
checked by structure only. `yamllint` lints values.yaml and the rendered output.
values.schema.json is closed: misspelt or ill-typed values fail the render. The rendering
helpers are tests/helm_render.py; all three tools are in the `dev` extra.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml
import yamllint.config as yamllint_config
import yamllint.linter as yamllint_linter

from tests.helm_render import (
    CHART,
    EVERYTHING,
    VARIANTS,
    chart,
    render,
    render_fails,
    render_files,
)

KUBE_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())

YAMLLINT_RULES = """
extends: default
rules:
  document-start: disable
  line-length: {max: 120}
  comments: {min-spaces-from-content: 1}
  braces: {max-spaces-inside: 1}
"""


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_validate_against_kubernetes_schemas(variant: str) -> None:
    docs = render(VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {
        "StatefulSet",
        "Service",
        "Job",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "NetworkPolicy",
    } <= kinds
    for doc in docs:
        assert doc["metadata"]["name"] and len(doc["metadata"]["name"]) <= 63, doc["metadata"]
        if doc["kind"] == "ServiceMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(doc["spec"]) <= {"jobLabel", "selector", "namespaceSelector", "endpoints"}
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")


def _lint(text: str, rules: str, name: str) -> list[str]:
    conf = yamllint_config.YamlLintConfig(rules)
    return [
        f"{name}:{p.line}: {p.message} ({p.rule})"
        for p in yamllint_linter.run(text, conf)
        if p.level == "error"
    ]


def test_yamllint_values_and_rendered_output() -> None:
    problems = _lint((CHART / "values.yaml").read_text(), YAMLLINT_RULES, "values.yaml")
    problems += _lint((CHART / "Chart.yaml").read_text(), YAMLLINT_RULES, "Chart.yaml")
    # Rendered output: the dashboards' JSON lines may be long.
    rendered_rules = YAMLLINT_RULES.replace("line-length: {max: 120}", "line-length: disable")
    for variant, values in VARIANTS.items():
        for path, text in render_files(values).items():
            if not path.endswith(".txt") and text.strip():
                # blank lines around a template's output are Helm's, not part of a manifest
                problems += _lint(text.strip("\n") + "\n", rendered_rules, f"{variant}:{path}")
    assert not problems, "\n".join(problems)


def test_schema_is_draft07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    for key in ("teacher", "rollout", "router", "trainer", "storage", "apiKey"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]), "values.yaml and the schema disagree"


@pytest.mark.parametrize(
    "values, where",
    [
        ({"teacher": {"replica": 2}}, "replica"),  # typo'd key
        ({"trainr": {"nnodes": 2}}, "trainr"),  # typo'd section
        ({"teacher": {"replicas": "two"}}, "replicas"),  # bad type
        ({"rollout": {"tensorParallelSize": 0}}, "tensorParallelSize"),
        ({"teacher": {"dtype": "fp8"}}, "dtype"),
        ({"router": {"policy": "least_busy"}}, "policy"),
        ({"storage": {"modelCache": {"type": "hostPath"}}}, "type"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    assert where in render_fails(values)


def test_schema_accepts_the_defaults_and_variants() -> None:
    for values in VARIANTS.values():
        chart().validate_schema(values)


def test_values_do_not_leak_between_renders() -> None:
    values = copy.deepcopy(EVERYTHING)
    render(values)
    assert values == EVERYTHING
