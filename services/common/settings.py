"""Service settings: one pydantic-settings model per service, read from CLI flags and `OPD_*` env.

Precedence (highest first): command-line flag, environment variable (`OPD_<FIELD>`, e.g.
`OPD_API_KEY`, `OPD_MAX_MODEL_LEN`), field default. `parse_settings` builds the command line
from the model's fields, so a field added to a settings class is a flag at once:
`max_model_len` -> `--max-model-len 2048`, a bool -> `--enforce-eager / --no-enforce-eager`,
the help text is the field's description.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.engine.base import EngineConfig

S = TypeVar("S", bound=BaseSettings)

# EngineConfig fields that are not flags: the service decides (the rollout service turns vLLM's
# weight transfer on, the teacher leaves it off).
SERVICE_ENGINE_FIELDS = frozenset({"weight_transfer"})


class ServiceSettings(BaseSettings):
    """Everything a service process needs: the engine, the socket, the key and the limits.

    Engine fields mirror `services.engine.base.EngineConfig` (same names, same meaning) and
    are handed over by `engine_config()`. Limits are enforced by `services.common` before any
    work reaches the engine; each violation is a 4xx naming the field.
    """

    model_config = SettingsConfigDict(
        env_prefix="OPD_",
        extra="ignore",
        protected_namespaces=(),
        validate_default=True,
    )

    # ---------------------------------------------------------------- engine (EngineConfig)
    model: str = Field(description="hub id or local path of a transformers checkpoint")
    backend: Literal["vllm", "hf"] = Field("hf", description="engine backend")
    served_model_name: str | None = Field(
        None, description="model name shown in /v1/models and answers; default: --model"
    )
    tokenizer: str | None = Field(None, description="tokenizer path or id; default: --model")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights and compute dtype"
    )
    device: str = Field("auto", description="hf backend: 'cpu', 'cuda', 'cuda:1' or 'auto'")
    max_model_len: int | None = Field(
        None, ge=2, description="longest sequence (prompt + completion); default: the model's"
    )
    seed: int = Field(0, description="engine seed")
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm: fraction of GPU memory to use"
    )
    enforce_eager: bool = Field(False, description="vllm: no CUDA graphs / torch.compile")
    max_num_seqs: int = Field(256, ge=1, description="vllm: sequences per engine step")
    max_batch_tokens: int = Field(
        16384, ge=1, description="hf: padded tokens per forward batch"
    )
    batch_wait_ms: float = Field(2.0, ge=0.0, description="hf: how long to gather a batch")

    # ---------------------------------------------------------------- server
    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    api_key: SecretStr | None = Field(
        None,
        description="when set, every route except /health, /ready and /metrics needs "
        "'Authorization: Bearer KEY'",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn and service log level"
    )
    access_log: bool = Field(True, description="log one line per request (uvicorn)")

    # ---------------------------------------------------------------- limits
    # Shaped like trainer/config.py's fields only: those are the trainer's own knobs.
    max_sequences_per_request: int = Field(
        4096, ge=1, description="sequences (score) or prompts x n (generate) in one request"
    )
    max_tokens_per_request: int = Field(
        4_194_304,
        ge=1,
        description="tokens in one request: sum of sequence lengths (score), or prompt "
        "tokens + n x max_tokens per prompt (generate)",
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="largest request body in bytes (413 beyond)"
    )
    max_top_k: int = Field(
        20, ge=0, description="largest top_k / logprobs / top_logprobs a request may ask for"
    )
    max_n: int = Field(64, ge=1, description="largest n (samples per prompt)")
    max_concurrent_requests: int = Field(
        256,
        ge=1,
        description="requests admitted at once (POST/PUT/PATCH/DELETE); beyond it the "
        "service answers 429 with Retry-After instead of queueing",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429/503")
    request_timeout_s: float = Field(
        600.0, gt=0.0, description="a request still running after this gets 503 (timeout)"
    )

    def engine_config(self) -> EngineConfig:
        """The `EngineConfig` these settings describe (every EngineConfig field is mirrored,
        except those a service sets itself: `SERVICE_ENGINE_FIELDS`)."""
        names = set(EngineConfig.model_fields) - SERVICE_ENGINE_FIELDS
        return EngineConfig(**{name: getattr(self, name) for name in names})

    def limits(self) -> dict[str, int]:
        """The limits as published in `/info` (`InfoResponse.limits`)."""
        # A literal like PromptSampler.state_dict's in shape only: these keys are /info's.
        return {
            "max_sequences_per_request": self.max_sequences_per_request,
            "max_tokens_per_request": self.max_tokens_per_request,
            "max_body_bytes": self.max_body_bytes,
            "max_top_k": self.max_top_k,
            "max_n": self.max_n,
            "max_concurrent_requests": self.max_concurrent_requests,
        }

    def api_key_value(self) -> str | None:
        """The API key in clear, or None when the service is open."""
        if self.api_key is None:
            return None
        value = self.api_key.get_secret_value()
        return value or None


# --------------------------------------------------------------------------- CLI


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    annotation, optional = _unwrap_optional(field.annotation)
    help_ = field.description or ""
    if not field.is_required():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = "***"
        shown = "" if default is None else f"default: {default}; "
        help_ = f"{help_} ({shown}env OPD_{name.upper()})"
    else:
        help_ = f"{help_} (required; env OPD_{name.upper()})"
    # SUPPRESS: an absent flag leaves the key out, so env and defaults still apply.
    common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_}
    if annotation is bool:
        parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
        return
    if typing.get_origin(annotation) is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        parser.add_argument(_flag(name), choices=choices, metavar="{" + ",".join(choices) + "}",
                            **common)
        return
    if annotation in (int, float, str):
        metavar = {int: "INT", float: "FLOAT", str: "STR"}[annotation]
        # Optional numbers accept "none" so a flag can undo an env value.
        parser.add_argument(_flag(name), type=str if optional else annotation,
                            metavar=metavar, **common)
        return
    # Anything else (lists, dicts, SecretStr): a string, or JSON for structured values.
    parser.add_argument(_flag(name), type=str, metavar="VALUE", **common)


def _coerce(value: Any, field: Any) -> Any:
    """CLI strings for structured or optional fields: 'none' -> None, JSON where it parses."""
    if not isinstance(value, str):
        return value
    annotation, optional = _unwrap_optional(field.annotation)
    if optional and value.lower() in ("none", "null"):
        return None
    if annotation not in (str, SecretStr) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def build_parser(cls: type[BaseSettings], prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `cls` (see module docstring)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().splitlines()[0],
    )
    for name, field in cls.model_fields.items():
        _add_field(parser, name, field)
    return parser


def parse_settings(cls: type[S], argv: list[str] | None = None, *, prog: str | None = None,
                   description: str | None = None) -> S:
    """Build `cls` from command-line flags over `OPD_*` env over defaults.

    Errors (unknown flag, bad value, missing required field) exit like argparse does:
    usage on stderr, status 2, with pydantic's message naming the field.
    """
    parser = build_parser(cls, prog=prog, description=description)
    namespace = parser.parse_args(argv)
    overrides = {
        key: _coerce(value, cls.model_fields[key]) for key, value in vars(namespace).items()
    }
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0]))} (env OPD_{str(err['loc'][0]).upper()}): {err['msg']}"
            if err["loc"] else f"settings: {err['msg']}"
            for err in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits
