"""The Helm chart's optional vllm-router in front of the teacher pool (its flags checked against
`vllm-router --help` when installed), its Dockerfile, the NetworkPolicies and the Services'
selectors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helm_render import (
    CHART,
    EVERYTHING,
    RELEASE,
    VARIANTS,
    container,
    env,
    find,
    render,
    render_fails,
    trainer_command_and_config,
)
from tests.scripts import REPO_ROOT

ROUTER_DOCKERFILE = REPO_ROOT / "deploy" / "helm" / "router.Dockerfile"


def _router_help() -> str | None:
    exe = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not Path(exe).is_file():
        return None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    return out.stdout if out.returncode == 0 else None


def test_router_in_front_of_the_teacher_pool(tmp_path: Path) -> None:
    docs = render(EVERYTHING)
    router = find(docs, "Deployment", f"{RELEASE}-router")
    args = container(router)["args"]
    urls = args[args.index("--worker-urls") + 1 :]
    urls = urls[: next(i for i, a in enumerate(urls) if a.startswith("--"))]
    teacher = find(docs, "StatefulSet", f"{RELEASE}-teacher")
    assert urls == [
        f"http://{RELEASE}-teacher-{i}.{teacher['spec']['serviceName']}:8001" for i in range(3)
    ]
    assert "--policy=power_of_two" in args and "--health-check-endpoint=/ready" in args
    assert "--api-key=$(OPD_API_KEY)" in args and "OPD_API_KEY" in env(container(router))
    _, cfg = trainer_command_and_config(docs, tmp_path)
    assert cfg.services.teacher_urls == [f"http://{RELEASE}-router:8001"]  # not the pods
    assert "2 teacher replicas" in render_fails({"router": {"enabled": True}})
    render({"router": {"enabled": True, "policy": "round_robin"}})  # one teacher is fine then
    help_text = _router_help()
    if help_text is None:
        pytest.skip("vllm-router not installed: its flags are unchecked")
    known = set(re.findall(r"(--[a-z0-9-]+)", help_text))
    used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert used <= known, used - known
    policies = json.loads((CHART / "values.schema.json").read_text())["properties"]["router"][
        "properties"
    ]["policy"]["enum"]
    assert set(policies) <= set(
        re.search(r"--policy \{([a-z_,]+)\}", help_text).group(1).split(",")
    )


def test_router_dockerfile() -> None:
    text = ROUTER_DOCKERFILE.read_text()
    assert "vllm-router==0.1.17" in text and re.search(r"^USER 10001", text, re.M)
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint not installed (scripts/install_tools.sh)")
    out = subprocess.run(
        [hadolint, "--no-color", str(ROUTER_DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


# =========================================================================== network


def _pod_labels(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    (workload,) = [
        d
        for d in docs
        if d["kind"] in ("StatefulSet", "Job", "Deployment")
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = peer.get("podSelector", {}).get("matchLabels")
    return (
        selector is not None
        and "namespaceSelector" not in peer
        and selector.items() <= labels.items()
    )


def test_network_policy_scope() -> None:
    docs = render()
    trainer, teacher = _pod_labels(docs, "trainer"), _pod_labels(docs, "teacher")
    rollout_np = find(docs, "NetworkPolicy", f"{RELEASE}-rollout")
    assert (
        rollout_np["spec"]["podSelector"]["matchLabels"].items()
        <= _pod_labels(docs, "rollout").items()
    )
    assert rollout_np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = rollout_np["spec"]["ingress"]  # by default: the trainer and nobody else
    assert [_selects(p, trainer) for p in rule["from"]] == [True]
    assert not _selects(rule["from"][0], teacher)
    assert rule["ports"] == [{"port": 8002, "protocol": "TCP"}]
    teacher_np = find(docs, "NetworkPolicy", f"{RELEASE}-teacher")
    (rule,) = teacher_np["spec"]["ingress"]
    assert [_selects(p, trainer) for p in rule["from"]] == [True]
    assert rule["ports"] == [{"port": 8001, "protocol": "TCP"}]
    # with the router and extra peers
    docs = render(EVERYTHING)
    teacher_np = find(docs, "NetworkPolicy", f"{RELEASE}-teacher")
    peers = teacher_np["spec"]["ingress"][0]["from"]
    assert any(_selects(p, _pod_labels(docs, "router")) for p in peers)
    rollout_rules = find(docs, "NetworkPolicy", f"{RELEASE}-rollout")["spec"]["ingress"]
    assert len(rollout_rules) == 3  # trainer, rolloutFrom, metricsFrom
    assert all(r["ports"] == [{"port": 8002, "protocol": "TCP"}] for r in rollout_rules)
    router_np = find(docs, "NetworkPolicy", f"{RELEASE}-router")
    assert [
        _selects(p, _pod_labels(docs, "trainer")) for p in router_np["spec"]["ingress"][0]["from"]
    ] == [True]
    assert not [
        d for d in render({"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"
    ]


def test_services_select_their_pods() -> None:
    for values in VARIANTS.values():
        docs = render(values)
        for service in (d for d in docs if d["kind"] == "Service"):
            component = service["metadata"]["labels"]["app.kubernetes.io/component"]
            selector = dict(service["spec"]["selector"])
            selector.pop("batch.kubernetes.io/job-completion-index", None)  # set by the Job
            assert selector.items() <= _pod_labels(docs, component).items(), service["metadata"]
            (workload,) = [
                d
                for d in docs
                if d["kind"] in ("StatefulSet", "Job", "Deployment")
                and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
            ]
            names = {
                p["name"]
                for c in workload["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            ports = {
                p["containerPort"]
                for c in workload["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                assert target in names or target in ports, (service["metadata"]["name"], target)
