"""The Helm chart deploy/helm/opd rendered without a cluster and without a helm binary, and
readers of the rendered manifests, shared by the tests/test_helm_*.py files.

`helm-python-sdk` (PyPI; Helm v4's Go SDK as a shared library driven through ctypes):
`Chart.load(...).render(values)` is `helm template` offline, including the values.schema.json
check (a value the schema refuses fails the render, as `helm install` would). The chart is
loaded once and each set of values rendered once per session (cached), whichever test file
asks first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.scripts import REPO_ROOT

CHART = REPO_ROOT / "deploy" / "helm" / "opd"
RELEASE, NAMESPACE = "opd", "ml"

MULTI_NODE = {"trainer": {"nnodes": 3, "nprocPerNode": 4}}
EVERYTHING = {
    "router": {"enabled": True},
    "teacher": {
        "replicas": 3,
        "extraArgs": ["--max-num-seqs", "128"],
        "extraEnv": [{"name": "OPD_LOG_LEVEL", "value": "debug"}],
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}},
    },
    "hfToken": {"value": "hf_xxx"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "grafana": {"datasource": {"enabled": True}},
    "storage": {"modelCache": {"type": "emptyDir", "sizeLimit": "60Gi"}},
    "networkPolicy": {
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "rolloutFrom": [{"podSelector": {"matchLabels": {"role": "eval"}}}],
    },
    "trainer": {
        "nnodes": 2,
        "nprocPerNode": 8,
        "dataDir": "/shared/gsm8k",
        "overrides": ["trainer.lr=2e-5"],
        "nodeSelector": {"gpu": "h100"},
    },
}
VARIANTS = {"default": {}, "multi-node": MULTI_NODE, "everything": EVERYTHING}


@functools.cache
def chart() -> Any:
    helm.disable_logging()  # it logs each symlink it follows (dashboards/)
    return helm.Chart.load(CHART)


@functools.cache
def _render_cached(key: str) -> dict[str, str]:
    return chart().render(json.loads(key), name=RELEASE, namespace=NAMESPACE)


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (`helm template`)."""
    return _render_cached(json.dumps(values or {}, sort_keys=True))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rendered manifest, parsed (NOTES.txt left out)."""
    docs = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def mounts(workload: dict[str, Any], c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}


def trainer_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Job", f"{RELEASE}-trainer")


def trainer_config_text(docs: list[dict[str, Any]]) -> str:
    return find(docs, "ConfigMap", f"{RELEASE}-trainer-config")["data"]["trainer.yaml"]


def render_fails(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info:
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return str(info.value)


def trainer_command_and_config(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[list[str], Any]:
    """The trainer's command, and the TrainConfig it resolves to (as `opd train` would)."""
    from trainer.config import load_config

    cmd = container(trainer_job(docs))["command"]
    assert cmd[0] == "torchrun" and cmd[cmd.index("-m") + 1] == "trainer"
    args = cmd[cmd.index("-m") + 2 :]
    configs = [a for a in args if a.endswith(".yaml")]
    assert configs == ["/etc/opd/trainer.yaml"], args
    job = trainer_job(docs)
    config_mount = mounts(job, container(job))[str(Path(configs[0]).parent)]
    assert config_mount["configMap"]["name"] == f"{RELEASE}-trainer-config"
    path = tmp_path / "trainer.yaml"
    path.write_text(trainer_config_text(docs))
    resume = [a.split("=", 1)[1] for a in args if a.startswith("--resume=")]
    assert len(resume) == 1, args
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return cmd, load_config(path, [f"run_dir={resume[0]}", *overrides])
