"""The trainer's configuration: one pydantic model, loaded from YAML, overridable key by key.

```
opd train examples/opd_gsm8k/opd_gsm8k.yaml trainer.lr=2e-5 algorithm.kl_coef=0.5
```

Every section forbids unknown keys, so a typo fails before anything starts and the message
names the dotted key (``rollout.max_tokenz: Extra inputs are not permitted``). Values given on
the command line are parsed as YAML (``2e-5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list,
``null`` -> None). Cross-field rules live in :meth:`TrainConfig._cross_checks`.

The reference (`docs/trainer.md`) is generated from these models by
``scripts/gen_config_docs.py``: write each field's ``description`` for a reader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from trainer.config_sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    RolloutConfig,
    Section,
    ServicesConfig,
    StudentConfig,
    SyncConfig,
    TeacherConfig,
    TeacherContextConfig,
    TrainerConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "RolloutConfig",
    "ServicesConfig",
    "StudentConfig",
    "SyncConfig",
    "TeacherConfig",
    "TeacherContextConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending dotted key."""


# --------------------------------------------------------------------------------- root


class TrainConfig(Section):
    """Everything one `opd train` run needs."""

    run_dir: str = Field(
        "runs/opd", description="metrics, checkpoints, plots and the resolved config go here"
    )
    seed: int = Field(0, description="seeds data order, rollout sampling and torch")
    student: StudentConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: LossConfig = Field(default_factory=LossConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        problems: list[str] = []
        t = self.trainer
        if self.rollout.max_tokens >= t.max_model_len:
            problems.append(
                f"rollout.max_tokens ({self.rollout.max_tokens}) must be below "
                f"trainer.max_model_len ({t.max_model_len}) to leave room for the prompt"
            )
        evaluates = self.eval.interval > 0 or self.eval.at_start or self.eval.at_end
        if evaluates and self.eval.max_tokens >= t.max_model_len:
            problems.append(
                f"eval.max_tokens ({self.eval.max_tokens}) must be below "
                f"trainer.max_model_len ({t.max_model_len})"
            )
        if t.micro_batch_tokens < t.max_model_len:
            problems.append(
                f"trainer.micro_batch_tokens ({t.micro_batch_tokens}) must hold one sequence of "
                f"trainer.max_model_len ({t.max_model_len}) tokens"
            )
        if t.total_steps is not None and t.warmup_steps > t.total_steps:
            problems.append(
                f"trainer.warmup_steps ({t.warmup_steps}) exceeds trainer.total_steps "
                f"({t.total_steps})"
            )
        if (
            self.algorithm.algorithm == "jsd"
            and self.algorithm.lambda_coef == 1.0
            and not self.algorithm.allow_anti_distillation
        ):
            # The kernel and the reference keep b = 1 exact (j_t = tau - s); only a run of it
            # needs the explicit opt-in, since it trains the student away from the teacher.
            problems.append(
                "algorithm.lambda_coef 1 with algorithm 'jsd' trains the student away from the "
                "teacher: its cost j_t = tau - s makes the advantage c (s - tau), which rewards "
                "the tokens the teacher rates lower. To distill use algorithm: on_policy_distill "
                "(advantage c (tau - s), the distillation direction) or a lambda_coef below 1, "
                "or set algorithm.allow_anti_distillation: true to run it anyway"
            )
        if self.rollout.mask_truncated == "sampled_token" and not self.algorithm.teacher_top_k:
            problems.append(
                "rollout.mask_truncated 'sampled_token' keeps truncated responses in the "
                "teacher's top-k term only, and algorithm.teacher_top_k is 0: set a top-k, or "
                "use mask_truncated: true"
            )
        if not all(0.0 <= b < 1.0 for b in t.betas):
            problems.append(f"trainer.betas {list(t.betas)} must each lie in [0, 1)")
        if self.sync.method == "load" and not self.sync.shared_dir:
            problems.append(
                "sync.method is 'load' but sync.shared_dir is not set: give the directory "
                "(inside the rollout service's --weights-dir) the trainer writes weights to"
            )
        if self.sync.service_dir and not self.sync.shared_dir:
            problems.append("sync.service_dir is set but sync.shared_dir is not")
        for key in ("teacher_url", "rollout_url"):
            url, urls = getattr(self.services, key), getattr(self.services, key + "s")
            if url is not None and urls is not None:
                problems.append(
                    f"services.{key} and services.{key}s are both set: give one (the list for "
                    f"several replicas; services.{key}=null drops the single URL)"
                )
            if urls is not None and not urls:
                problems.append(f"services.{key}s is empty: list at least one URL")
            if urls is not None and len(set(urls)) != len(urls):
                problems.append(f"services.{key}s lists a URL twice: {urls}")
            for where, value in [(key, url)] if urls is None else [(f"{key}s", u) for u in urls]:
                if value is not None and not re.match(r"^https?://[^/\s]+", value):
                    problems.append(f"services.{where} {value!r} is not an http(s):// URL")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def teacher_temperature(self) -> float:
        """The temperature the teacher scores at (defaults to the sampling temperature)."""
        return self.teacher.temperature or self.rollout.temperature


# --------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"trainer.lr=2e-5"` -> `(["trainer", "lr"], 2e-05)`; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each `dotted.key=value` in a (copied) raw config dict; sections are created."""
    out: dict[str, Any] = _deep_copy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            # Cross-field checks name their keys themselves, one problem per "; ".
            lines.extend(f"  {problem}" for problem in msg.split("; "))
            continue
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> TrainConfig:
    """Validate a raw dict; raises :class:`ConfigError` naming every bad dotted key."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from nothing), apply dotted overrides, validate.

    Raises:
        ConfigError: unreadable file, bad YAML, bad override, or any validation failure.
    """
    raw: Any = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        try:
            raw = _yaml_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides " + " ".join(overrides)
    return config_from_dict(raw, source)


def dump_config(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML (what RUN_DIR/config.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
