"""The Helm chart tied to the code as tests/test_deploy_compose.py ties compose: ports are the
services' settings defaults and the trainer's `logging.metrics_port`, probes use /ready and
/health, nvidia.com/gpu equals the tensor-parallel size, every OPD_* variable names a settings
field, and the API key and HF token come from Secrets.
"""

from __future__ import annotations

import pytest
import yaml

from tests.code_defaults import (
    default_port,
    rollout_settings,
    teacher_settings,
    trainer_metrics_port,
)
from tests.helm_render import (
    EVERYTHING,
    RELEASE,
    container,
    env,
    find,
    render,
    trainer_config_text,
    trainer_job,
)


def test_ports_are_the_code_defaults() -> None:
    docs = render()
    for component, settings in (("teacher", teacher_settings()), ("rollout", rollout_settings())):
        port = default_port(settings)
        sts = find(docs, "StatefulSet", f"{RELEASE}-{component}")
        c = container(sts)
        assert c["ports"] == [{"name": "http", "containerPort": port}], component
        assert env(c)["OPD_PORT"]["value"] == str(port)
        for name in (f"{RELEASE}-{component}", f"{RELEASE}-{component}-headless"):
            assert find(docs, "Service", name)["spec"]["ports"][0]["port"] == port, name
    metrics_port = trainer_metrics_port()
    job = trainer_job(docs)
    assert container(job)["ports"][0]["containerPort"] == metrics_port
    assert (
        find(docs, "Service", f"{RELEASE}-trainer-metrics")["spec"]["ports"][0]["port"]
        == metrics_port
    )
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
    docs = render(
        {
            "teacher": {"tensorParallelSize": teacher_tp},
            "rollout": {"tensorParallelSize": rollout_tp},
        }
    )
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
    docs = render(
        {
            "apiKey": {"existingSecret": "mine", "secretKey": "k"},
            "hfToken": {"existingSecret": "tok"},
        }
    )
    assert not [d for d in docs if d["kind"] == "Secret"]
    variables = env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))
    assert variables["OPD_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}
    assert variables["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tok"
    docs = render({"apiKey": {"enabled": False}})
    assert "OPD_API_KEY" not in env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))
    assert "HF_TOKEN" not in env(container(find(docs, "StatefulSet", f"{RELEASE}-teacher")))
