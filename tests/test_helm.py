"""The Helm chart deploy/helm/opd: rendered and checked without a cluster and without a helm binary.

- Rendering: `helm-python-sdk` (PyPI; Helm v4's Go SDK as a shared library driven through
  ctypes): `Chart.load(...).render(values)` is `helm template` offline, including the
  values.schema.json check (a value the schema refuses fails the render, as `helm install` would).
- Every rendered manifest is validated against the Kubernetes OpenAPI schemas, offline, by
  `kubernetes-validate` (strict: unknown fields fail) for the oldest Kubernetes the chart supports
  (Chart.yaml kubeVersion, 1.28) and the newest schema shipped; the ServiceMonitor (a CRD) is
  checked by structure only. `yamllint` lints values.yaml and the rendered output.
- The checks tie the chart to the code as tests/test_deploy.py does for compose: ports are the
  services' settings defaults and the trainer's `logging.metrics_port`, probes use /ready and
  /health, nvidia.com/gpu equals the tensor-parallel size (or torchrun's ranks per pod), every
  OPD_* variable names a settings field, the weights dir is one volume path for rollout and
  trainer, and the trainer's command + ConfigMap parse into a valid TrainConfig equal to
  examples/opd_gsm8k/opd_gsm8k.yaml with the in-cluster settings on top.

All three tools are in the `dev` extra; without them the module is skipped.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
import yamllint.config as yamllint_config
import yamllint.linter as yamllint_linter

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "deploy" / "helm" / "opd"
DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"
EXAMPLE_CONFIG = REPO_ROOT / "examples" / "opd_gsm8k" / "opd_gsm8k.yaml"
ROUTER_DOCKERFILE = REPO_ROOT / "deploy" / "helm" / "router.Dockerfile"
RELEASE, NAMESPACE = "opd", "ml"
KUBE_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())

MULTI_NODE = {"trainer": {"nnodes": 3, "nprocPerNode": 4}}
EVERYTHING = {
    "router": {"enabled": True},
    "teacher": {"replicas": 3, "extraArgs": ["--max-num-seqs", "128"],
                "extraEnv": [{"name": "OPD_LOG_LEVEL", "value": "debug"}],
                "resources": {"requests": {"cpu": "8", "memory": "64Gi"}}},
    "hfToken": {"value": "hf_xxx"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "grafana": {"datasource": {"enabled": True}},
    "storage": {"modelCache": {"type": "emptyDir", "sizeLimit": "60Gi"}},
    "networkPolicy": {
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}],
        "rolloutFrom": [{"podSelector": {"matchLabels": {"role": "eval"}}}],
    },
    "trainer": {"nnodes": 2, "nprocPerNode": 8, "dataDir": "/shared/gsm8k",
                "overrides": ["trainer.lr=2e-5"], "nodeSelector": {"gpu": "h100"}},
}
VARIANTS = {"default": {}, "multi-node": MULTI_NODE, "everything": EVERYTHING}

YAMLLINT_RULES = """
extends: default
rules:
  document-start: disable
  line-length: {max: 120}
  comments: {min-spaces-from-content: 1}
  braces: {max-spaces-inside: 1}
"""


# =========================================================================== rendering


@functools.cache
def _chart() -> Any:
    helm.disable_logging()  # it logs each symlink it follows (dashboards/)
    return helm.Chart.load(CHART)


@functools.cache
def _render_cached(key: str) -> dict[str, str]:
    return _chart().render(json.loads(key), name=RELEASE, namespace=NAMESPACE)


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
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return str(info.value)


def _settings(module: str, cls: str) -> Any:
    return getattr(importlib.import_module(module), cls)


def teacher_settings() -> Any:
    return _settings("services.teacher.app", "TeacherSettings")


def rollout_settings() -> Any:
    return _settings("services.student_rollout.settings", "RolloutSettings")


def _trainer_metrics_port() -> int:
    from trainer.config import LoggingConfig

    return int(LoggingConfig.model_fields["metrics_port"].default)


# =========================================================================== validity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_validate_against_kubernetes_schemas(variant: str) -> None:
    docs = render(VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "Job", "ConfigMap", "Secret", "PersistentVolumeClaim",
            "NetworkPolicy"} <= kinds
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
    return [f"{name}:{p.line}: {p.message} ({p.rule})"
            for p in yamllint_linter.run(text, conf) if p.level == "error"]


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


@pytest.mark.parametrize("values, where", [
    ({"teacher": {"replica": 2}}, "replica"),                      # typo'd key
    ({"trainr": {"nnodes": 2}}, "trainr"),                         # typo'd section
    ({"teacher": {"replicas": "two"}}, "replicas"),                # bad type
    ({"rollout": {"tensorParallelSize": 0}}, "tensorParallelSize"),
    ({"teacher": {"dtype": "fp8"}}, "dtype"),
    ({"router": {"policy": "least_busy"}}, "policy"),
    ({"storage": {"modelCache": {"type": "hostPath"}}}, "type"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    assert where in render_fails(values)


def test_schema_accepts_the_defaults_and_variants() -> None:
    for values in VARIANTS.values():
        _chart().validate_schema(values)


# =========================================================================== code defaults


def test_ports_are_the_code_defaults() -> None:
    docs = render()
    for component, settings in (("teacher", teacher_settings()), ("rollout", rollout_settings())):
        port = int(settings.model_fields["port"].default)
        sts = find(docs, "StatefulSet", f"{RELEASE}-{component}")
        c = container(sts)
        assert c["ports"] == [{"name": "http", "containerPort": port}], component
        assert env(c)["OPD_PORT"]["value"] == str(port)
        for name in (f"{RELEASE}-{component}", f"{RELEASE}-{component}-headless"):
            assert find(docs, "Service", name)["spec"]["ports"][0]["port"] == port, name
    metrics_port = _trainer_metrics_port()
    job = trainer_job(docs)
    assert container(job)["ports"][0]["containerPort"] == metrics_port
    assert find(docs, "Service", f"{RELEASE}-trainer-metrics")["spec"]["ports"][0][
        "port"] == metrics_port
    assert yaml.safe_load(trainer_config_text(docs))["logging"]["metrics_port"] == metrics_port


def test_probes() -> None:
    docs = render()
    for component in ("teacher", "rollout"):
        c = container(find(docs, "StatefulSet", f"{RELEASE}-{component}"))
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/ready"
        # compose's start_period: 20 minutes for the first download and vLLM's start-up
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, component


@pytest.mark.parametrize("teacher_tp, rollout_tp", [(2, 1), (4, 2), (8, 1)])
def test_gpu_requests_equal_tensor_parallel_size(teacher_tp: int, rollout_tp: int) -> None:
    docs = render({"teacher": {"tensorParallelSize": teacher_tp},
                   "rollout": {"tensorParallelSize": rollout_tp}})
    for component, tp in (("teacher", teacher_tp), ("rollout", rollout_tp)):
        c = container(find(docs, "StatefulSet", f"{RELEASE}-{component}"))
        assert env(c)["OPD_TENSOR_PARALLEL_SIZE"]["value"] == str(tp)
        assert c["resources"]["requests"]["nvidia.com/gpu"] == tp, component
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp, component


def test_default_layout_is_the_reference_job() -> None:
    docs = render()
    teacher = container(find(docs, "StatefulSet", f"{RELEASE}-teacher"))
    rollout = container(find(docs, "StatefulSet", f"{RELEASE}-rollout"))
    assert env(teacher)["OPD_MODEL"]["value"] == "Qwen/Qwen2.5-Math-7B-Instruct"
    assert env(rollout)["OPD_MODEL"]["value"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert rollout["resources"]["limits"]["nvidia.com/gpu"] == 1
    trainer = container(trainer_job(docs))
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--nproc-per-node=1" in trainer["command"]
    for c in (teacher, rollout):
        assert env(c)["OPD_BACKEND"]["value"] == "vllm"
        assert env(c)["OPD_MAX_MODEL_LEN"]["value"] == "2048"
        assert "command" not in c, "the images' ENTRYPOINT (opd teacher / opd rollout) runs"
    images = {c["image"] for c in (teacher, rollout, trainer)}
    assert images == {"opd-teacher:dev", "opd-student-rollout:dev", "opd-trainer:dev"}


def test_env_names_are_settings_fields_and_secrets() -> None:
    docs = render(EVERYTHING)
    for component, settings in (("teacher", teacher_settings()), ("rollout", rollout_settings())):
        variables = env(container(find(docs, "StatefulSet", f"{RELEASE}-{component}")))
        fields = set(settings.model_fields)
        for name in variables:
            if name.startswith("OPD_"):
                assert name.removeprefix("OPD_").lower() in fields, f"{component}: {name}"
        assert variables["HF_HOME"]["value"] == "/cache/huggingface"
    trainer = env(container(trainer_job(docs)))
    from trainer.config import ServicesConfig

    key_env = ServicesConfig.model_fields["api_key_env"].default
    secret = find(docs, "Secret", f"{RELEASE}-api-key")
    token = find(docs, "Secret", f"{RELEASE}-hf-token")
    for variables in (
        env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher"))),
        env(container(find(docs, "StatefulSet", f"{RELEASE}-rollout"))),
        trainer,
    ):
        ref = variables[key_env]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
        ref = variables["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == token["metadata"]["name"] and ref["key"] in token["data"]
    assert trainer["OPD_DATA_DIR"]["value"] == "/shared/gsm8k"
    assert len(secret["data"]["api-key"]) > 20  # generated


def test_existing_secrets_and_no_key() -> None:
    docs = render({"apiKey": {"existingSecret": "mine", "secretKey": "k"},
                   "hfToken": {"existingSecret": "tok"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    variables = env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))
    assert variables["OPD_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}
    assert variables["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tok"
    docs = render({"apiKey": {"enabled": False}})
    assert "OPD_API_KEY" not in env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))
    assert "HF_TOKEN" not in env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))


# =========================================================================== volumes, trainer


def test_weights_dir_is_shared_between_rollout_and_trainer() -> None:
    docs = render()
    sts = find(docs, "StatefulSet", f"{RELEASE}-rollout")
    job = trainer_job(docs)
    weights_dir = env(container(sts))["OPD_WEIGHTS_DIR"]["value"]
    cfg = yaml.safe_load(trainer_config_text(docs))
    assert cfg["sync"] == {**cfg["sync"], "method": "load", "shared_dir": weights_dir}
    rollout_mounts, trainer_mounts = mounts(sts, container(sts)), mounts(job, container(job))
    (mount,) = [m for m in rollout_mounts if weights_dir.startswith(m.rstrip("/") + "/")]
    claim = rollout_mounts[mount]["persistentVolumeClaim"]["claimName"]
    assert trainer_mounts[mount]["persistentVolumeClaim"]["claimName"] == claim
    assert cfg["run_dir"].startswith(mount + "/")
    pvc = find(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cache = "/cache/huggingface"
    for workload in (sts, job, find(docs, "StatefulSet", f"{RELEASE}-teacher")):
        assert mounts(workload, container(workload))[cache]["persistentVolumeClaim"]
        assert "/dev/shm" in mounts(workload, container(workload))
    assert "/shared" not in mounts(find(docs, "StatefulSet", f"{RELEASE}-teacher"),
                                   container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))
    docs = render({"storage": {"shared": {"existingClaim": "nfs"},
                               "modelCache": {"type": "emptyDir"}}})
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    job = trainer_job(docs)
    assert mounts(job, container(job))["/shared"]["persistentVolumeClaim"]["claimName"] == "nfs"
    assert "emptyDir" in mounts(job, container(job))[cache]


def _command_config(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[list[str], Any]:
    """The trainer's command, and the TrainConfig it resolves to (as `opd train` would)."""
    from trainer.config import load_config

    cmd = container(trainer_job(docs))["command"]
    assert cmd[0] == "torchrun" and cmd[cmd.index("-m") + 1] == "trainer"
    args = cmd[cmd.index("-m") + 2:]
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_command_is_a_valid_config(variant: str, tmp_path: Path) -> None:
    docs = render(VARIANTS[variant])
    cmd, cfg = _command_config(docs, tmp_path)
    assert "--resume=/shared/runs/opd_gsm8k" in cmd
    assert cfg.run_dir == "/shared/runs/opd_gsm8k"
    assert cfg.logging.metrics_port == _trainer_metrics_port()
    assert cfg.logging.progress_bar is False
    # The URL lists name Services of this release, on their ports: each pod of a pool by its
    # headless Service (ordinals 0..replicas-1), or the router alone.
    assert cfg.services.teacher_url is None and cfg.services.rollout_url is None
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    routed = bool(VARIANTS[variant].get("router"))
    for urls, component in ((cfg.services.teacher_urls, "router" if routed else "teacher"),
                            (cfg.services.rollout_urls, "rollout")):
        assert urls and len(set(urls)) == len(urls), urls
        for ordinal, url in enumerate(urls):
            match = re.fullmatch(r"http://([a-z0-9.-]+):(\d+)", url)
            assert match, url
            host, port = match.group(1), int(match.group(2))
            service = services[host.split(".")[-1]]
            assert service["metadata"]["labels"]["app.kubernetes.io/component"] == component
            assert port in {p["port"] for p in service["spec"]["ports"]}
            if "." in host:  # a pod by its headless Service
                pod, _ = host.split(".", 1)
                sts = find(docs, "StatefulSet", pod.rsplit("-", 1)[0])
                assert pod == f"{sts['metadata']['name']}-{ordinal}"
                assert sts["spec"]["serviceName"] == service["metadata"]["name"]
                assert service["spec"]["clusterIP"] == "None"
                assert len(urls) == sts["spec"]["replicas"]
    # The init container waits for every replica of both pools.
    init = trainer_job(docs)["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][3:] == [*cfg.services.teacher_urls, *cfg.services.rollout_urls]
    assert cfg.student.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.teacher.model == "Qwen/Qwen2.5-Math-7B-Instruct"
    if variant == "everything":
        assert cfg.trainer.lr == 2e-5


def test_trainer_config_is_the_reference_example(tmp_path: Path) -> None:
    """The chart's trainer.config is examples/opd_gsm8k/opd_gsm8k.yaml (the same resolved
    config once the chart's in-cluster settings are applied to both)."""
    from trainer.config import load_config

    _, cfg = _command_config(render(), tmp_path)
    in_cluster = [f"run_dir={cfg.run_dir}",
                  "services.teacher_url=null", "services.rollout_url=null",
                  f"services.teacher_urls={json.dumps(cfg.services.teacher_urls)}",
                  f"services.rollout_urls={json.dumps(cfg.services.rollout_urls)}",
                  "sync.method=load", f"sync.shared_dir={cfg.sync.shared_dir}",
                  f"logging.metrics_port={cfg.logging.metrics_port}",
                  "logging.progress_bar=false"]
    example = load_config(EXAMPLE_CONFIG, in_cluster)
    assert cfg.model_dump() == example.model_dump()


def test_single_node_trainer_is_standalone_torchrun() -> None:
    docs = render()
    job = trainer_job(docs)
    cmd = container(job)["command"]
    assert cmd[:3] == ["torchrun", "--standalone", "--nproc-per-node=1"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert job["spec"]["backoffLimit"] == 5  # compose: restart on-failure:5


def test_multi_node_trainer_is_an_indexed_job_with_c10d() -> None:
    docs = render(MULTI_NODE)
    job = trainer_job(docs)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    pod = spec["template"]["spec"]
    c = container(job)
    flags = dict(a.split("=", 1) for a in c["command"] if a.startswith("--") and "=" in a)
    assert "--standalone" not in c["command"]
    assert flags["--nnodes"] == "3" and flags["--nproc-per-node"] == "4"
    assert flags["--rdzv-backend"] == "c10d"
    headless = find(docs, "Service", pod["subdomain"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    name = job["metadata"]["name"]
    host, port = flags["--rdzv-endpoint"].rsplit(":", 1)
    assert host == f"{name}-0.{pod['subdomain']}"  # pod 0's hostname under the subdomain
    assert int(port) in {p["port"] for p in headless["spec"]["ports"]}
    # --local-addr: each pod's own DNS name, index from the Job's completion-index annotation
    assert flags["--local-addr"] == f"{name}-$(OPD_NODE_INDEX).{pod['subdomain']}"
    index = env(c)["OPD_NODE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "batch.kubernetes.io/job-completion-index" in index
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    metrics = find(docs, "Service", f"{name}-metrics")
    assert metrics["spec"]["selector"]["batch.kubernetes.io/job-completion-index"] == "0"
    assert "prometheus.io/scrape" not in spec["template"]["metadata"].get("annotations", {})
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(c["command"][1:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.module) == ("3", "4", True)
    assert parsed.training_script == "trainer"


def test_replicas_from_values(tmp_path: Path) -> None:
    docs = render({"teacher": {"replicas": 3}, "rollout": {"replicas": 2}})
    assert find(docs, "StatefulSet", f"{RELEASE}-teacher")["spec"]["replicas"] == 3
    assert find(docs, "StatefulSet", f"{RELEASE}-rollout")["spec"]["replicas"] == 2
    for name in ("teacher", "rollout"):
        sts = find(docs, "StatefulSet", f"{RELEASE}-{name}")
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert find(docs, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # The trainer lists every pod of both pools by its headless-Service DNS name.
    _, cfg = _command_config(docs, tmp_path)
    assert cfg.services.teacher_urls == [
        f"http://{RELEASE}-teacher-{i}.{RELEASE}-teacher-headless:8001" for i in range(3)]
    assert cfg.services.rollout_urls == [
        f"http://{RELEASE}-rollout-{i}.{RELEASE}-rollout-headless:8002" for i in range(2)]
    _, cfg = _command_config(render(), tmp_path)
    assert (cfg.services.teacher_urls, cfg.services.rollout_urls) == (
        [f"http://{RELEASE}-teacher-0.{RELEASE}-teacher-headless:8001"],
        [f"http://{RELEASE}-rollout-0.{RELEASE}-rollout-headless:8002"])
    assert "at least one teacher and one rollout replica" in render_fails(
        {"rollout": {"replicas": 0}})
    render({"rollout": {"replicas": 0}, "trainer": {"enabled": False}})  # scaled down, no trainer


# =========================================================================== router


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
    urls = args[args.index("--worker-urls") + 1:]
    urls = urls[:next(i for i, a in enumerate(urls) if a.startswith("--"))]
    teacher = find(docs, "StatefulSet", f"{RELEASE}-teacher")
    assert urls == [f"http://{RELEASE}-teacher-{i}.{teacher['spec']['serviceName']}:8001"
                    for i in range(3)]
    assert "--policy=power_of_two" in args and "--health-check-endpoint=/ready" in args
    assert "--api-key=$(OPD_API_KEY)" in args and "OPD_API_KEY" in env(container(router))
    _, cfg = _command_config(docs, tmp_path)
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
        "properties"]["policy"]["enum"]
    assert set(policies) <= set(re.search(r"--policy \{([a-z_,]+)\}", help_text).group(1)
                                .split(","))


def test_router_dockerfile() -> None:
    text = ROUTER_DOCKERFILE.read_text()
    assert "vllm-router==0.1.17" in text and re.search(r"^USER 10001", text, re.M)
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint not installed (scripts/install_tools.sh)")
    out = subprocess.run([hadolint, "--no-color", str(ROUTER_DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


# =========================================================================== network


def _pod_labels(docs: list[dict[str, Any]], component: str) -> dict[str, str]:
    (workload,) = [d for d in docs if d["kind"] in ("StatefulSet", "Job", "Deployment")
                   and d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = peer.get("podSelector", {}).get("matchLabels")
    return (selector is not None and "namespaceSelector" not in peer
            and selector.items() <= labels.items())


def test_network_policy_scope() -> None:
    docs = render()
    trainer, teacher = _pod_labels(docs, "trainer"), _pod_labels(docs, "teacher")
    rollout_np = find(docs, "NetworkPolicy", f"{RELEASE}-rollout")
    assert rollout_np["spec"]["podSelector"]["matchLabels"].items() <= _pod_labels(
        docs, "rollout").items()
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
    assert [_selects(p, _pod_labels(docs, "trainer")) for p in
            router_np["spec"]["ingress"][0]["from"]] == [True]
    assert not [d for d in render({"networkPolicy": {"enabled": False}})
                if d["kind"] == "NetworkPolicy"]


def test_services_select_their_pods() -> None:
    for values in VARIANTS.values():
        docs = render(values)
        for service in (d for d in docs if d["kind"] == "Service"):
            component = service["metadata"]["labels"]["app.kubernetes.io/component"]
            selector = dict(service["spec"]["selector"])
            selector.pop("batch.kubernetes.io/job-completion-index", None)  # set by the Job
            assert selector.items() <= _pod_labels(docs, component).items(), service["metadata"]
            (workload,) = [d for d in docs if d["kind"] in ("StatefulSet", "Job", "Deployment")
                           and d["metadata"]["labels"]["app.kubernetes.io/component"] ==
                           component]
            names = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            ports = {p["containerPort"] for c in workload["spec"]["template"]["spec"][
                "containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                assert target in names or target in ports, (service["metadata"]["name"], target)


# =========================================================================== metrics


def test_scrape_annotations_and_service_monitor() -> None:
    docs = render(EVERYTHING)
    for component, port in (("teacher", 8001), ("rollout", 8002)):
        sts = find(docs, "StatefulSet", f"{RELEASE}-{component}")
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                               "prometheus.io/path": "/metrics"}
    single = trainer_job(render())["spec"]["template"]["metadata"]["annotations"]
    assert single["prometheus.io/port"] == str(_trainer_metrics_port())
    monitor = find(docs, "ServiceMonitor", RELEASE)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [d for d in docs if d["kind"] == "Service"
               and selector.items() <= d["metadata"]["labels"].items()]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    jobs = set()
    for service in scraped:
        names = {p["name"] for p in service["spec"]["ports"]}
        assert len(names & endpoint_ports) == 1, service["metadata"]["name"]
        jobs.add(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
    # the job names the dashboards (and compose's deploy/prometheus.yml) use
    assert {"teacher", "student_rollout", "trainer"} <= jobs
    dashboards = " ".join(f.read_text() for f in DASHBOARD_DIR.glob("*.json"))
    for regex in re.findall(r'job=~\\"([^\\]+)\\"', dashboards):
        assert set(regex.split("|")) <= jobs
    for job in re.findall(r'job=\\"([a-z_]+)\\"', dashboards):
        assert job in jobs
    # each pool is scraped pod by pod (the headless Services), not through the ClusterIP one
    assert {s["metadata"]["name"] for s in scraped} == {
        f"{RELEASE}-teacher-headless", f"{RELEASE}-rollout-headless",
        f"{RELEASE}-trainer-metrics", f"{RELEASE}-router-metrics"}


def test_grafana_dashboards_are_the_compose_files() -> None:
    files = {f.name: f.read_text() for f in sorted(DASHBOARD_DIR.glob("*.json"))}
    assert files
    # the chart's dashboards/ (a link to deploy/grafana/dashboards/) as Helm loads it
    chart_files = {Path(f["name"]).name: f["data"] for f in _chart().files
                   if f["name"].startswith("dashboards/")}
    assert chart_files == files
    docs = render()
    maps = [d for d in docs if d["kind"] == "ConfigMap"
            and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    rendered = {name: text for d in maps for name, text in d["data"].items()}
    assert rendered == files, "the chart's dashboards differ from deploy/grafana/dashboards/"
    for d in maps:
        assert d["metadata"]["annotations"]["grafana_folder"] == "OPD"
    datasource = find(render(EVERYTHING), "ConfigMap", f"{RELEASE}-datasource")
    uids = {m for text in files.values() for m in re.findall(r'"uid": "(opd-prometheus)"', text)}
    assert yaml.safe_load(datasource["data"]["opd-datasource.yaml"])["datasources"][0][
        "uid"] in uids


def test_values_do_not_leak_between_renders() -> None:
    values = copy.deepcopy(EVERYTHING)
    render(values)
    assert values == EVERYTHING
