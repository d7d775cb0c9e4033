"""The engine interface both services are written against, and its plain data types.

An engine owns one model and its tokenizer. It scores token sequences (teacher), samples
completions with the logprob of each sampled token (rollout), and, when the service allows it,
swaps its weights. Two backends implement it: `vllm` (vLLM's AsyncLLM) and `hf` (transformers,
the reference the other is tested against).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .tokenization import load_tokenizer

if TYPE_CHECKING:
    from services.protocol import BroadcastInitRequest, BroadcastRequest


class EngineConfig(BaseModel):
    """How to load and run a model. Backends ignore knobs that do not apply to them."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="hub id or local path of a transformers checkpoint")
    backend: Literal["vllm", "hf"] = "hf"
    served_model_name: str | None = Field(None, description="name in /v1/models; default: model")
    tokenizer: str | None = Field(None, description="tokenizer path or id; default: model")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="hf backend: 'cpu', 'cuda', 'cuda:1', or 'auto'")
    max_model_len: int | None = Field(None, ge=2, description="default: the model's own")
    seed: int = 0
    trust_remote_code: bool = False
    # vllm backend
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    enforce_eager: bool = False
    max_num_seqs: int = Field(256, ge=1)
    weight_transfer: bool = Field(
        False,
        description="vllm: start vLLM's weight-transfer engine, so weights can arrive over a "
        "broadcast (set by the rollout service, not a flag)",
    )
    # hf backend: dynamic batching
    max_batch_tokens: int = Field(16384, ge=1, description="hf: padded tokens per forward batch")
    batch_wait_ms: float = Field(2.0, ge=0.0, description="hf: how long to gather a batch")


@dataclass(frozen=True)
class ScoreInput:
    """Score `token_ids[start:]`, each token given all tokens before it."""

    token_ids: list[int]
    start: int
    top_k: int = 0
    temperature: float = 1.0


@dataclass
class ScoreResult:
    """`logprobs[i] = log p(token_ids[start+i] | token_ids[:start+i])` at the temperature."""

    logprobs: np.ndarray  # float32 [n]
    top_token_ids: np.ndarray | None = None  # int32 [n, k]
    top_logprobs: np.ndarray | None = None  # float32 [n, k]


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one generate call (applied to every prompt in it)."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # OpenAI `logprobs`/`top_logprobs`: alternatives per sampled token


@dataclass
class GeneratedSample:
    """One completion. `logprobs[i]` is that of `token_ids[i]` under the sampled distribution
    (after temperature; greedy at temperature 0 reports the temperature-1 logprob)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]
    top_logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None


@dataclass
class EngineInfo:
    model: str
    served_model_name: str
    backend: Literal["vllm", "hf"]
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: list[int] = field(default_factory=list)
    # One hash per tokenizer part (vocab, merges, special tokens, chat template), so a client
    # that finds two fingerprints different can tell which part differs.
    tokenizer_fingerprint_components: dict[str, str] = field(default_factory=dict)


class WeightsError(ValueError):
    """A weight update was refused; the engine still serves the old weights."""


class EngineRequestError(ValueError):
    """A request this backend cannot serve as asked (a client error: services answer 400).

    Raised for what the wire models cannot rule out on their own, e.g. a temperature outside
    the range a backend supports, or a prompt the engine itself rejects. The message names the
    field (and sequence / prompt index) at fault.
    """


class BroadcastReceiver(abc.ABC):
    """Weight broadcasts taken by the engine itself, where its model lives (the vllm backend:
    inside vLLM's worker process), instead of by the service.

    The rollout service checks every request first (`services.student_rollout.broadcast`) and
    calls, in order: `join` once per group; per broadcast `receive` (every bucket into
    staging, checked, nothing changes), then either `commit` (under the service's write lock)
    or `discard`; `leave` when the group is dropped. Failures raise `WeightsError` when the
    weights do not fit, `RuntimeError` otherwise; either way the old weights keep serving.
    """

    @abc.abstractmethod
    def unsupported(self) -> str | None:
        """None when broadcasts work on this engine as started; else why not."""

    @abc.abstractmethod
    async def join(self, init: BroadcastInitRequest, host: str) -> None:
        """Join the trainer's group as `init.rank` (gloo bound to `host`); returns once every
        rank is in, raises when joining fails or times out."""

    @abc.abstractmethod
    async def receive(self, request: BroadcastRequest) -> None:
        """Receive the buckets of `request` over the joined group into staging and check them
        against the model; the serving weights are untouched."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Swap the received weights in (a failure part-way restores the previous ones)."""

    @abc.abstractmethod
    async def discard(self) -> None:
        """Drop what `receive` staged (a cancelled or refused broadcast); idempotent."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Drop the group (a no-op when none is joined or the engine has stopped)."""


class Engine(abc.ABC):
    """One model behind one async interface; both services talk only to this."""

    config: EngineConfig
    _tokenizer: Any = None

    @property
    def tokenizer(self):  # transformers.PreTrainedTokenizerBase
        """The model's tokenizer (used for chat templates and text forms): the transformers
        tokenizer of the model's files, loaded on first use, so also before `start`."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config)
        return self._tokenizer

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; after this `info()` and the work methods are usable."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Free the model and any worker processes."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """Static facts about the loaded model."""

    def health(self) -> str | None:
        """None while the engine can serve; else why not (`/ready` then answers 503, so an
        orchestrator restarts the service instead of routing work to it)."""
        return None

    @abc.abstractmethod
    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Per-token logprobs for each input (inputs are already validated)."""

    @abc.abstractmethod
    async def generate(
        self, prompts: Sequence[list[int]], spec: SamplingSpec
    ) -> list[list[GeneratedSample]]:
        """`spec.n` samples for each prompt; outer list follows `prompts`."""

    @abc.abstractmethod
    async def load_weights(self, checkpoint_dir: str) -> None:
        """Replace the weights with those of a validated safetensors directory.

        Raises `WeightsError` (old weights untouched) when the checkpoint does not fit."""

    # Optional: weights handed over in memory (the rollout service's broadcast transport).

    def tensor_weights_unsupported(self) -> str | None:
        """None when `load_weights_from_tensors` works on this engine; else why not."""
        return (
            f"the {self.config.backend} backend cannot take weights as in-memory tensors "
            "(no broadcast transport)"
        )

    async def load_weights_from_tensors(self, tensors: Mapping[str, Any], source: str) -> None:
        """Replace the weights with `{name: torch.Tensor}` already checked against the
        initial checkpoint's names, shapes and dtypes (`source` labels them in logs).

        Raises `WeightsError` (old weights untouched) when they do not fit, and
        `NotImplementedError` where `tensor_weights_unsupported()` says why not."""
        raise NotImplementedError(self.tensor_weights_unsupported())

    def broadcast_receiver(self) -> BroadcastReceiver | None:
        """The engine's own broadcast receiver, or None when the service receives broadcasts
        itself and hands the tensors to `load_weights_from_tensors`."""
        return None
