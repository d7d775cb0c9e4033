"""Trainer config: YAML loading, dotted overrides, validation messages, the shipped examples,
the generated docs, and `opd train` failing fast on a bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.scripts import REPO_ROOT
from trainer.cli import train_main
from trainer.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
)

EXAMPLES = REPO_ROOT / "examples" / "opd_gsm8k"
MINIMAL = ["student.model=some/model"]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_reference_configs_match_the_issue() -> None:
    opd = load_config(EXAMPLES / "opd_gsm8k.yaml")
    jsd = load_config(EXAMPLES / "opd_gsm8k_jsd.yaml")
    for cfg in (opd, jsd):
        assert cfg.student.model == "Qwen/Qwen2.5-1.5B-Instruct"
        assert cfg.teacher.model == "Qwen/Qwen2.5-Math-7B-Instruct"
        assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (96, 8)
        assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_tokens == 1024
        t = cfg.trainer
        assert (t.lr, t.weight_decay, t.lr_schedule, t.grad_clip) == (1e-5, 0.01, "constant", 1.0)
        assert t.max_model_len == 2048 and t.epochs == 1 and t.total_steps is None
        a = cfg.algorithm
        assert (a.kl_coef, a.loss, a.clip_eps, a.dual_clip, a.aggregation) == (
            1.0,
            "ppo",
            0.2,
            3.0,
            "token-mean",
        )
        assert cfg.sync.max_staleness == 1  # one step stale; the PPO ratio corrects it
        assert isinstance(t.lr, float)
    assert opd.algorithm.algorithm == "on_policy_distill"
    assert jsd.algorithm.algorithm == "jsd" and jsd.algorithm.lambda_coef == 0.5


def test_privileged_information_config_is_the_reference_recipe_plus_the_context() -> None:
    opd = load_config(EXAMPLES / "opd_gsm8k.yaml")
    pi = load_config(EXAMPLES / "opd_gsm8k_privileged.yaml")
    assert pi.teacher.context.reference_solution and pi.teacher.context.few_shot == 0
    assert pi.algorithm.teacher_top_k == 16 and pi.algorithm.top_k_beta == 0.0
    assert pi.trainer.max_model_len == 3072
    same = ("student", "rollout")
    for section in same:
        assert getattr(pi, section) == getattr(opd, section), section
    assert pi.trainer.lr == opd.trainer.lr and pi.teacher.model == opd.teacher.model


def test_top_k_and_context_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="algorithm.teacher_top_k"):
        load_config(None, [*MINIMAL, "algorithm.teacher_top_k=-1"])
    with pytest.raises(ConfigError, match="algorithm.top_k_beta"):
        load_config(None, [*MINIMAL, "algorithm.top_k_beta=1.5"])
    with pytest.raises(ConfigError, match="teacher.context.few_shots"):
        load_config(None, [*MINIMAL, "teacher.context.few_shots=2"])
    with pytest.raises(ConfigError, match="teacher.context.few_shot"):
        load_config(None, [*MINIMAL, "teacher.context.few_shot=-2"])


def test_overrides_are_yaml_parsed_and_nested() -> None:
    cfg = load_config(
        EXAMPLES / "opd_gsm8k.yaml",
        [
            "trainer.lr=2e-5",
            "algorithm.kl_coef=0.5",
            "eval.limit=null",
            "logging.tensorboard=false",
            "trainer.betas=[0.9, 0.95]",
            "rollout.max_tokens=512",
        ],
    )
    assert cfg.trainer.lr == 2e-5 and isinstance(cfg.trainer.lr, float)
    assert cfg.algorithm.kl_coef == 0.5
    assert cfg.eval.limit is None and cfg.logging.tensorboard is False
    assert cfg.trainer.betas == (0.9, 0.95) and cfg.rollout.max_tokens == 512
    assert parse_override("a.b.c=x=y") == (["a", "b", "c"], "x=y")
    assert apply_overrides({}, ["x.y=1"]) == {"x": {"y": 1}}


def test_config_from_overrides_only_and_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, MINIMAL)
    again = load_config(_write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["rollout.max_tokenz=5"], "rollout.max_tokenz: unknown key"),
        (["algorithm.clip_epsilon=0.1"], "algorithm.clip_epsilon: unknown key"),
        (["trainer.lr=-1"], "trainer.lr: Input should be greater than 0"),
        (["algorithm.algorithm=kl"], "algorithm.algorithm"),
        (
            ["rollout.max_tokens=4096"],
            "rollout.max_tokens (4096) must be below trainer.max_model_len",
        ),
        (["sync.method=load"], "sync.method is 'load' but sync.shared_dir is not set"),
        (["trainer.micro_batch_tokens=100"], "trainer.micro_batch_tokens (100) must hold"),
        (["services.teacher_url=localhost:8001"], "services.teacher_url"),
        (["rollout.temperature=0"], "rollout.temperature"),
        (["trainer.lr"], "not of the form section.key=value"),
        (["rollout.max_tokens=5", "rollout.max_tokens.x=1"], "rollout.max_tokens is a value"),
        (["rollout.mask_truncated=sometimes"], "rollout.mask_truncated"),
        (
            ["rollout.mask_truncated=sampled_token"],
            "rollout.mask_truncated 'sampled_token' keeps truncated responses in the teacher's "
            "top-k term only, and algorithm.teacher_top_k is 0",
        ),
    ],
)
def test_invalid_configs_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*MINIMAL, *overrides])
    assert needle in str(err.value)


def test_jsd_at_lambda_one_is_refused_unless_opted_in() -> None:
    # b = 1 makes j_t = tau - s: its advantage c (s - tau) trains away from the teacher.
    jsd1 = [*MINIMAL, "algorithm.algorithm=jsd", "algorithm.lambda_coef=1"]
    with pytest.raises(ConfigError) as err:
        load_config(None, jsd1)
    message = str(err.value)
    assert "trains the student away from the teacher" in message
    assert "on_policy_distill" in message and "c (tau - s)" in message
    assert "algorithm.allow_anti_distillation: true" in message

    cfg = load_config(None, [*jsd1, "algorithm.allow_anti_distillation=true"])
    assert cfg.algorithm.lambda_coef == 1.0 and cfg.algorithm.allow_anti_distillation
    for b in ("0", "0.5"):
        cfg = load_config(None, [*MINIMAL, "algorithm.algorithm=jsd", f"algorithm.lambda_coef={b}"])
        assert cfg.algorithm.lambda_coef == float(b)
    # on_policy_distill ignores lambda_coef (it only sets the logged rollout/jsd/mean).
    assert load_config(None, [*MINIMAL, "algorithm.lambda_coef=1"]).algorithm.lambda_coef == 1.0


@pytest.mark.parametrize(
    ("schedule", "warmup", "want"),
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant", 2, [0.5, 1.0, 1.0, 1.0, 1.0]),  # the first step already learns
        ("linear", 0, [1.0, 0.75, 0.5, 0.25, 0.0]),
        ("linear", 1, [1.0, 1.0, 2 / 3, 1 / 3, 0.0]),
        ("cosine", 0, [1.0, 0.5 + 0.5 ** 1.5, 0.5, 0.5 - 0.5 ** 1.5, 0.0]),
    ],
)
def test_lr_schedule_factors(schedule: str, warmup: int, want: list[float]) -> None:
    from trainer.optimization import lr_factor

    cfg = load_config(
        None, [*MINIMAL, f"trainer.lr_schedule={schedule}", f"trainer.warmup_steps={warmup}"]
    )
    got = [lr_factor(cfg.trainer, total_steps=4)(done) for done in range(5)]
    assert got == pytest.approx(want)


def test_missing_required_student_model() -> None:
    with pytest.raises(ConfigError, match="student: required key is missing"):
        load_config(None, ["seed=1"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_every_section_forbids_extra_keys() -> None:
    for name, field in TrainConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and hasattr(model, "model_config"):
            assert model.model_config.get("extra") == "forbid", name


def test_train_cli_fails_fast_on_invalid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, {"student": {"model": "x"}, "rollout": {"max_tokenz": 3}})
    assert train_main([str(path), "trainer.lr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "rollout.max_tokenz: unknown key" in err
    assert train_main([]) == 2
    assert train_main([str(path), str(path)]) == 2


def test_train_cli_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        train_main([str(EXAMPLES / "opd_gsm8k_jsd.yaml"), "--print-config", "trainer.lr=3e-6"]) == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["lr"] == 3e-6 and printed["algorithm"]["algorithm"] == "jsd"


def test_opd_train_subprocess_invalid_config_is_fast(tmp_path: Path) -> None:
    """The real entry point: exit code 2 and the key in the message, nothing started."""
    path = _write(tmp_path, {"student": {"model": "x"}, "sync": {"method": "load"}})
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "sync.shared_dir" in proc.stderr


def test_generated_docs_are_up_to_date() -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import gen_config_docs
    finally:
        sys.path.pop(0)
    current = gen_config_docs.DOC.read_text(encoding="utf-8")
    assert gen_config_docs.updated(current) == current, "run: python scripts/gen_config_docs.py"
