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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.algorithms import LossConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "RolloutConfig",
    "ServicesConfig",
    "StudentConfig",
    "SyncConfig",
    "TeacherConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending dotted key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------- sections


class StudentConfig(Section):
    """The trainable student model (loaded by the trainer with transformers)."""

    model: str = Field(description="hub id or local path of the student checkpoint")
    tokenizer: str | None = Field(None, description="tokenizer path or id; default: `model`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the trained (master) parameters and the optimizer state. Keep "
        "float32: at lr 1e-5 most bf16 updates would round away",
    )
    autocast_dtype: Literal["bfloat16", "float16"] | None = Field(
        None,
        description="run the forward/backward under torch.autocast in this dtype (GPU); the "
        "log-softmax of the vocabulary projection stays float32",
    )
    device: str = Field(
        "auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute decoder-layer activations in the backward (saves memory)"
    )
    logprob_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="response tokens projected to the vocabulary at once when computing the "
        "logprobs of the sampled tokens; full [tokens, vocab] float32 logits never exist",
    )
    attn_implementation: str | None = Field(
        "sdpa", description="transformers attention implementation ('sdpa', 'eager', ...)"
    )
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub")


class TeacherConfig(Section):
    """How the teacher service scores the student's tokens."""

    model: str | None = Field(
        None,
        description="the model the teacher service must serve, checked against its /info "
        "(model or served name; a local path matches a hub id by its last component); "
        "null: not checked",
    )
    temperature: float | None = Field(
        None, gt=0.0, description="scoring temperature (logits / T); null: `rollout.temperature`"
    )
    sequences_per_request: int = Field(
        64, ge=1, description="sequences per POST /v1/score (requests run concurrently)"
    )


class RolloutConfig(Section):
    """What the student samples each step (through the rollout service)."""

    prompts_per_step: int = Field(96, ge=1, description="GSM8K prompts drawn per step")
    samples_per_prompt: int = Field(8, ge=1, description="samples (n) per prompt")
    max_tokens: int = Field(1024, ge=1, description="response tokens at most per sample")
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="sampling temperature; the trainer computes its logprobs as "
        "log_softmax(logits / T) so the PPO ratio is 1 before the first update. No top-p/top-k: "
        "the trainer's logprobs are those of the full tempered distribution",
    )
    prompts_per_request: int = Field(
        8,
        ge=1,
        description="prompts per POST /v1/rollouts (requests run concurrently; each gets a "
        "seed derived from (seed, step, index of its first prompt))",
    )
    mask_truncated: bool = Field(
        False,
        description="drop responses cut at max_tokens (finish_reason 'length') from the loss. "
        "Off by default: a truncated response's per-token reverse KL is still exact",
    )


class TrainerConfig(Section):
    """Optimisation: AdamW, schedule, clipping, micro-batching, length of the run."""

    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate (peak, after warm-up)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule after warm-up (decays to 0 at the end)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from 0 to `lr`")
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="clip the global gradient norm to this; null: no clipping"
    )
    max_model_len: int = Field(
        2048, ge=2, description="longest prompt + response; longer prompts are dropped at load"
    )
    micro_batch_tokens: int = Field(
        16384,
        ge=2,
        description="padded tokens (sequences x longest length) per forward/backward; "
        "sequences are bucketed by length. Must hold one max_model_len sequence",
    )
    epochs: int = Field(1, ge=1, description="passes over the training prompts")
    total_steps: int | None = Field(
        None, ge=1, description="stop after this many steps; null: when `epochs` are done"
    )
    loss_backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="opd_loss backend: auto = Triton on CUDA, torch elsewhere"
    )


class SyncConfig(Section):
    """How new student weights reach the rollout service, and how stale a batch may be."""

    method: Literal["auto", "load", "upload"] = Field(
        "auto",
        description="'load': write safetensors into `shared_dir` and POST /v1/weights/load "
        "(both sides see the same disk); 'upload': PUT /v1/weights with the file as body; "
        "'auto': load when `shared_dir` is set and the service accepts it, else upload",
    )
    shared_dir: str | None = Field(
        None,
        description="trainer-side directory inside the rollout service's --weights-dir "
        "(needed for 'load')",
    )
    service_dir: str | None = Field(
        None,
        description="the same directory as the rollout service sees it (containers); "
        "default: `shared_dir`",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of pushed weights; 'auto': the dtype the student checkpoint was "
        "saved in (what the rollout service validates updates against)",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="0: strictly on-policy (generate, then train). K >= 1: up to K batches are "
        "generated ahead while the current one trains (policy/staleness <= K)",
    )


class DataConfig(Section):
    """Where the GSM8K prompts come from."""

    source: str | None = Field(
        None,
        description="directory with train.jsonl/test.jsonl, a .jsonl/.parquet file, a hub "
        "id, or 'bundled' (the GSM8K subset shipped with the package: 1,000 train and 200 "
        "test problems); null: $OPD_DATA_DIR, then the hub's openai/gsm8k",
    )
    train_limit: int | None = Field(
        None, ge=1, description="use only the first N training problems"
    )
    shuffle: bool = Field(True, description="reshuffle the prompts every epoch (seeded)")


class EvalConfig(Section):
    """Greedy GSM8K test accuracy through the rollout service."""

    interval: int = Field(
        0, ge=0, description="evaluate every N steps (0: only at start/end as set below)"
    )
    at_start: bool = Field(True, description="evaluate the initial weights (logged at step 0)")
    at_end: bool = Field(True, description="evaluate after the last step")
    limit: int | None = Field(None, ge=1, description="first N test problems; null: all 1319")
    max_tokens: int = Field(1024, ge=1, description="response tokens at most (greedy)")
    prompts_per_request: int = Field(32, ge=1, description="prompts per POST /v1/rollouts")
    kl_prompts: int = Field(
        0,
        ge=0,
        description="also measure eval/reverse_kl: sample on the first N test prompts at "
        "`rollout.temperature`, score with the teacher, mean per-token (s - tau). 0: off",
    )
    kl_samples_per_prompt: int = Field(
        4, ge=1, description="samples per prompt for eval/reverse_kl"
    )


class CheckpointConfig(Section):
    """Atomic, resumable checkpoints under RUN_DIR/checkpoints/step-NNNNNN."""

    interval: int = Field(
        50, ge=0, description="save every N steps (0: only at the end, when `at_end`)"
    )
    at_end: bool = Field(True, description="save after the last step")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    save_optimizer: bool = Field(
        True, description="include the optimizer state (needed for an exact resume)"
    )


class LoggingConfig(Section):
    """Metrics sinks: RUN_DIR/metrics.jsonl always; TensorBoard, Prometheus, progress bar."""

    metrics_port: int = Field(
        8003, ge=0, le=65535, description="Prometheus /metrics port of the trainer; 0: off"
    )
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    tensorboard: bool = Field(
        True, description="also write TensorBoard events to RUN_DIR/tensorboard (if installed)"
    )
    progress_bar: bool = Field(True, description="live tqdm progress bar with the key numbers")
    samples_per_step: int = Field(
        2, ge=0, description="responses per step written to RUN_DIR/samples.jsonl"
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")


class ServicesConfig(Section):
    """Where the teacher and rollout services are, and how to talk to them."""

    teacher_url: str = Field("http://localhost:8001", description="teacher service base URL")
    rollout_url: str = Field("http://localhost:8002", description="rollout service base URL")
    api_key_env: str = Field(
        "OPD_API_KEY",
        description="environment variable holding the services' API key (sent as Bearer); "
        "unset or empty: no key. The key itself never goes into a config file",
    )
    # Field runs shaped like TrainerConfig's only: each section declares its own knobs.
    request_timeout_s: float = Field(
        900.0, gt=0.0, description="timeout of one HTTP request (a whole rollout batch)"
    )
    ready_timeout_s: float = Field(
        900.0, gt=0.0, description="how long to wait at start for both services' /ready"
    )
    retry_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="give up on a failing request after retrying this long (covers a service "
        "restart)",
    )
    max_attempts: int = Field(30, ge=1, description="attempts per request at most")
    backoff_initial_s: float = Field(0.5, gt=0.0, description="first retry delay")
    backoff_max_s: float = Field(30.0, gt=0.0, description="longest retry delay")
    max_concurrency: int = Field(8, ge=1, description="HTTP requests in flight per service")


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
            url = getattr(self.services, key)
            if not re.match(r"^https?://[^/\s]+", url):
                problems.append(f"services.{key} {url!r} is not an http(s):// URL")
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
