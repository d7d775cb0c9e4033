"""The wire contract: every request and response body of the teacher and rollout services.

One module, imported by the services (to validate) and by the trainer (to build requests and
parse answers), so both sides cannot drift. Field names and meanings are those of
docs/design.md §3. OpenAI-compatible bodies (`/v1/completions`, `/v1/chat/completions`) live in
`services/openai_protocol.py`.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Encoding = Literal["json", "base64"]


class StrictModel(BaseModel):
    """Unknown fields are errors: a typo in a request must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- arrays


class B64Array(BaseModel):
    """A numeric array sent as base64 of its little-endian bytes (`encoding: "base64"`)."""

    dtype: Literal["float32", "int32"]
    shape: list[int]
    data: str

    @classmethod
    def encode(cls, array: Any, dtype: Literal["float32", "int32"]) -> B64Array:
        """Encode any array-like as little-endian `dtype`."""
        arr = np.ascontiguousarray(np.asarray(array, dtype=np.dtype(dtype).newbyteorder("<")))
        return cls(dtype=dtype, shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode())

    def decode(self) -> np.ndarray:
        """Back to a native-endian numpy array of the given shape."""
        raw = base64.b64decode(self.data)
        arr = np.frombuffer(raw, dtype=np.dtype(self.dtype).newbyteorder("<"))
        return arr.reshape(self.shape).astype(self.dtype)


FloatArray = list[float] | B64Array
IntArray = list[int] | B64Array
FloatMatrix = list[list[float]] | B64Array
IntMatrix = list[list[int]] | B64Array


def encode_array(values: Any, dtype: Literal["float32", "int32"], encoding: Encoding) -> Any:
    """Encode for the wire: a plain JSON list, or a `B64Array`."""
    if encoding == "base64":
        return B64Array.encode(values, dtype)
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values) if not isinstance(values, list) else values


def decode_array(value: Any) -> np.ndarray:
    """Decode either wire form to a numpy array."""
    if isinstance(value, B64Array):
        return value.decode()
    if isinstance(value, dict):
        return B64Array.model_validate(value).decode()
    return np.asarray(value)


# --------------------------------------------------------------------------- chat


class ChatMessage(BaseModel):
    """One chat message. `content` is text (multi-part content is flattened by the server)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- teacher: /v1/score


class ScoreSequence(StrictModel):
    """One sequence to score, in exactly one of three forms.

    - `token_ids` (+ `start`, default 1): score `token_ids[start:]`, each given its prefix;
    - `prompt` + `completion`: the teacher tokenizes `prompt + completion` and scores the
      completion's tokens;
    - `messages` + `completion`: chat template with the generation prompt, then the completion.
    """

    token_ids: list[int] | None = None
    start: int | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    completion: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ScoreSequence:
        forms = [self.token_ids is not None, self.prompt is not None, self.messages is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of `token_ids`, `prompt` or `messages`")
        if self.token_ids is not None:
            if self.completion is not None:
                raise ValueError("`completion` goes with `prompt` or `messages`, not `token_ids`")
        else:
            if self.completion is None:
                raise ValueError("`completion` is required with `prompt` or `messages`")
            if self.start is not None:
                raise ValueError("`start` goes with `token_ids` only")
        return self


class ScoreRequest(StrictModel):
    """`POST /v1/score`: teacher logprobs of given tokens."""

    model: str | None = None
    sequences: list[ScoreSequence]
    top_k: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0.0)
    encoding: Encoding = "json"


class ScoreItem(BaseModel):
    """Scores of one sequence: `logprobs[i]` is that of `token_ids[start + i]`."""

    index: int
    start: int
    token_ids: IntArray
    logprobs: FloatArray
    top_token_ids: IntMatrix | None = None
    top_logprobs: FloatMatrix | None = None


class ScoreUsage(BaseModel):
    prompt_tokens: int
    scored_tokens: int


class ScoreResponse(BaseModel):
    object: Literal["score"] = "score"
    model: str
    data: list[ScoreItem]
    usage: ScoreUsage


# --------------------------------------------------------------------------- rollout: /v1/rollouts


class RolloutPrompt(StrictModel):
    """One prompt, in exactly one form: chat `messages`, raw text `prompt`, or `token_ids`."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> RolloutPrompt:
        forms = [self.messages is not None, self.prompt is not None, self.token_ids is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of `messages`, `prompt` or `token_ids`")
        return self


class RolloutRequest(StrictModel):
    """`POST /v1/rollouts`: `n` samples for each prompt, with sampled-token logprobs."""

    # Shaped like ScoreRequest/ScoreItem only: each endpoint's body is its own contract.
    model: str | None = None
    prompts: list[RolloutPrompt]
    n: int = Field(1, ge=1)
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    encoding: Encoding = "json"


class RolloutItem(BaseModel):
    """One trajectory: `logprobs[i]` is the sampled `token_ids[i]`'s logprob after temperature."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: IntArray
    token_ids: IntArray
    logprobs: FloatArray
    text: str
    finish_reason: Literal["stop", "length"]
    policy_version: int


class RolloutUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class RolloutResponse(BaseModel):
    object: Literal["rollouts"] = "rollouts"
    model: str
    policy_version: int
    data: list[RolloutItem]
    usage: RolloutUsage


# --------------------------------------------------------------------------- rollout: weights


class WeightsLoadRequest(StrictModel):
    """`POST /v1/weights/load`: a safetensors checkpoint directory inside the weights dir."""

    path: str = Field(min_length=1)
    version: int = Field(ge=0)


class WeightsStatus(BaseModel):
    """`GET /v1/weights` and the answer to an update."""

    policy_version: int
    loaded_at: float = Field(description="unix time the current weights started serving")
    source: str = Field(description="'initial', a checkpoint path, 'upload' or 'broadcast'")
    update_seconds: float | None = None


# --------------------------------------------------------------------------- rollout: broadcast

#: Bytes per element of every dtype a broadcast may carry (torch's spelling).
BROADCAST_DTYPES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
BroadcastDtype = Literal[
    "float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint8", "bool",
]
GROUP_NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"


class BroadcastInitRequest(StrictModel):
    """`POST /v1/weights/broadcast/init`: join the trainer's weight-broadcast group.

    The trainer (rank 0) hosts a `torch.distributed.TCPStore` at `master_addr:master_port`;
    the replica joins as `rank` of `world_size` in a background thread and answers at once.
    """

    master_addr: str = Field(min_length=1, max_length=255,
                             description="host of the trainer's TCPStore (reachable from here)")
    master_port: int = Field(ge=1, le=65535)
    rank: int = Field(ge=1, description="this replica's rank, below `world_size`; the trainer "
                      "is rank 0")
    world_size: int = Field(ge=2, description="the trainer plus every replica")
    backend: Literal["gloo", "nccl"] = "gloo"
    group_name: str = Field(min_length=1, max_length=128, pattern=GROUP_NAME_PATTERN,
                            description="names this group; each broadcast repeats it")
    timeout_s: float = Field(600.0, gt=0.0, le=3600.0,
                             description="joining, and each bucket, fail after this long")


class BroadcastTensor(StrictModel):
    """One tensor of a broadcast's manifest, in the order the buckets carry them."""

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: BroadcastDtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * BROADCAST_DTYPES[self.dtype]


class BroadcastBucket(BaseModel):
    """One bucket of a broadcast: `tensors[i]` is `(manifest index, byte offset)`."""

    nbytes: int
    tensors: list[tuple[int, int]]


class BroadcastRequest(StrictModel):
    """`POST /v1/weights/broadcast`: receive `tensors` as `version` over the joined group.

    The data follow in buckets (`bucket_plan()`, computed the same way on both sides): each
    bucket is one `uint8` broadcast from rank 0 holding its tensors' bytes back to back.
    """

    version: int = Field(ge=0)
    group_name: str = Field(min_length=1, max_length=128, pattern=GROUP_NAME_PATTERN)
    tensors: list[BroadcastTensor] = Field(min_length=1)
    bucket_bytes: int = Field(
        ge=1024, le=16 * 1024**3,
        description="bytes per bucket at most (a larger tensor travels in a bucket of its own)",
    )

    def bucket_plan(self) -> list[BroadcastBucket]:
        """Tensors packed in manifest order into buckets of at most `bucket_bytes`."""
        buckets: list[BroadcastBucket] = []
        current: list[tuple[int, int]] = []
        size = 0
        for index, tensor in enumerate(self.tensors):
            nbytes = tensor.nbytes
            if current and size + nbytes > self.bucket_bytes:
                buckets.append(BroadcastBucket(nbytes=size, tensors=current))
                current, size = [], 0
            current.append((index, size))
            size += nbytes
        if current:
            buckets.append(BroadcastBucket(nbytes=size, tensors=current))
        return buckets


class BroadcastStatus(BaseModel):
    """`GET /v1/weights/broadcast`, and the answer of the other broadcast routes.

    `state`: `idle` (no group), `joining`, `ready` (joined, waiting for a broadcast),
    `receiving` (a broadcast is arriving or being swapped in), `failed` (the last join or
    broadcast failed: `error` says why; the group is gone, the old weights serve).
    """

    state: Literal["idle", "joining", "ready", "receiving", "failed"]
    group_name: str | None = None
    rank: int | None = None
    world_size: int | None = None
    backend: str | None = None
    version: int | None = Field(None, description="the version of the last broadcast")
    result: Literal["ok", "failed"] | None = Field(
        None, description="how the last broadcast ended (null while receiving or before one)"
    )
    buckets: int | None = None
    buckets_received: int = Field(
        0, description="buckets in so far (vllm backend: counted only once all have arrived)"
    )
    error: str | None = None
    policy_version: int = Field(description="the version serving now")


# --------------------------------------------------------------------------- both: /info


class InfoResponse(BaseModel):
    """`GET /info`: what a client must know before sending work."""

    # Repeats `services.engine.base.EngineInfo`'s fields on purpose (`ServiceState.info` copies
    # them over): the wire contract stays free of engine imports, for the trainer and clients.
    model_config = ConfigDict(protected_namespaces=())

    service: Literal["teacher", "student_rollout"]
    model: str
    served_model_name: str
    backend: Literal["vllm", "hf"]
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_fingerprint_components: dict[str, str] = Field(default_factory=dict)
    eos_token_ids: list[int]
    limits: dict[str, int]
    policy_version: int | None = None
    version: str


# --------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Annotated[str | int | None, Field()] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorInfo


class NotReadyResponse(ErrorResponse):
    """`GET /ready` 503: OpenAI's error body plus the engine's state."""

    status: Literal["loading", "failed", "broken"]


# --------------------------------------------------------------------------- both: probes


class HealthResponse(BaseModel):
    """`GET /health`: the process is up; `engine` is "loading", "ready" or "failed"."""

    status: Literal["ok"]
    engine: Literal["loading", "ready", "failed"]
    service: str


class ReadyResponse(BaseModel):
    """`GET /ready` 200: the model is loaded and the engine can serve."""

    status: Literal["ready"]
    model: str
