"""The Helm chart's trainer: the weights dir is one volume path for rollout and trainer, the
trainer's command + ConfigMap parse into a valid TrainConfig equal to
examples/opd_gsm8k/opd_gsm8k.yaml with the in-cluster settings on top, torchrun's layout on one
node and on several (an Indexed Job with c10d rendezvous), and the pools' replicas it lists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.code_defaults import trainer_metrics_port
from tests.helm_render import (
    MULTI_NODE,
    RELEASE,
    VARIANTS,
    container,
    env,
    find,
    mounts,
    render,
    render_fails,
    trainer_command_and_config,
    trainer_config_text,
    trainer_job,
)
from tests.scripts import REPO_ROOT

EXAMPLE_CONFIG = REPO_ROOT / "examples" / "opd_gsm8k" / "opd_gsm8k.yaml"


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
    assert "/shared" not in mounts(
        find(docs, "StatefulSet", f"{RELEASE}-teacher"),
        container(find(docs, "StatefulSet", f"{RELEASE}-teacher")),
    )
    docs = render(
        {"storage": {"shared": {"existingClaim": "nfs"}, "modelCache": {"type": "emptyDir"}}}
    )
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    job = trainer_job(docs)
    assert mounts(job, container(job))["/shared"]["persistentVolumeClaim"]["claimName"] == "nfs"
    assert "emptyDir" in mounts(job, container(job))[cache]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_command_is_a_valid_config(variant: str, tmp_path: Path) -> None:
    docs = render(VARIANTS[variant])
    cmd, cfg = trainer_command_and_config(docs, tmp_path)
    assert "--resume=/shared/runs/opd_gsm8k" in cmd
    assert cfg.run_dir == "/shared/runs/opd_gsm8k"
    assert cfg.logging.metrics_port == trainer_metrics_port()
    assert cfg.logging.progress_bar is False
    # The URL lists name Services of this release, on their ports: each pod of a pool by its
    # headless Service (ordinals 0..replicas-1), or the router alone.
    assert cfg.services.teacher_url is None and cfg.services.rollout_url is None
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    routed = bool(VARIANTS[variant].get("router"))
    for urls, component in (
        (cfg.services.teacher_urls, "router" if routed else "teacher"),
        (cfg.services.rollout_urls, "rollout"),
    ):
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

    _, cfg = trainer_command_and_config(render(), tmp_path)
    in_cluster = [
        f"run_dir={cfg.run_dir}",
        "services.teacher_url=null",
        "services.rollout_url=null",
        f"services.teacher_urls={json.dumps(cfg.services.teacher_urls)}",
        f"services.rollout_urls={json.dumps(cfg.services.rollout_urls)}",
        "sync.method=load",
        f"sync.shared_dir={cfg.sync.shared_dir}",
        f"logging.metrics_port={cfg.logging.metrics_port}",
        "logging.progress_bar=false",
    ]
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
    _, cfg = trainer_command_and_config(docs, tmp_path)
    assert cfg.services.teacher_urls == [
        f"http://{RELEASE}-teacher-{i}.{RELEASE}-teacher-headless:8001" for i in range(3)
    ]
    assert cfg.services.rollout_urls == [
        f"http://{RELEASE}-rollout-{i}.{RELEASE}-rollout-headless:8002" for i in range(2)
    ]
    _, cfg = trainer_command_and_config(render(), tmp_path)
    assert (cfg.services.teacher_urls, cfg.services.rollout_urls) == (
        [f"http://{RELEASE}-teacher-0.{RELEASE}-teacher-headless:8001"],
        [f"http://{RELEASE}-rollout-0.{RELEASE}-rollout-headless:8002"],
    )
    assert "at least one teacher and one rollout replica" in render_fails(
        {"rollout": {"replicas": 0}}
    )
    render({"rollout": {"replicas": 0}, "trainer": {"enabled": False}})  # scaled down, no trainer
