"""OpenAI-compatible bodies of `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

The shapes follow OpenAI's API reference (what the official `openai` client sends and parses)
plus the few vLLM extensions clients of vLLM rely on (`top_k`, `stop_token_ids`, `ignore_eos`,
`return_tokens_as_token_ids`, `add_special_tokens`, `add_generation_prompt`). Unknown fields
are ignored, as vLLM and OpenAI do, so newer clients keep working; known fields this server
cannot honour (penalties, `logit_bias`, tools, ...) are refused with a 400 by the routes rather
than silently ignored.

Our own wire contract (`/v1/score`, `/v1/rollouts`, ...) is in `services/protocol.py`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.protocol import ChatMessage

_INT64 = 2**63 - 1


class OpenAIModel(BaseModel):
    """Base of request bodies: unknown fields are ignored (OpenAI clients add fields over time)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema makes most fields nullable (`"n": null` = default); clients send it.
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields
                    or cls.model_fields[k].default is None}
        return data


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class _SamplingFields(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, description="choices per prompt")
    temperature: float | None = Field(None, ge=0.0, description="default 1.0; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-_INT64 - 1, le=_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 or 0: off")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


# --------------------------------------------------------------------------- completions


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`.

    `prompt`: a string, a list of strings, a list of token ids or a list of token-id lists.
    `echo: true, max_tokens: 0, logprobs: k` scores the prompt (vLLM's convention): each
    prompt token's logprob given the tokens before it (the first is null), with the top-k
    alternatives; the teacher's `/v1/score` returns the same numbers.
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, description="top alternatives per token")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    # vLLM extensions
    add_special_tokens: bool = Field(True, description="BOS etc. when tokenizing text prompts")
    return_tokens_as_token_ids: bool = Field(
        False, description="tokens as 'token_id:<id>' (unique keys in top_logprobs)"
    )


class CompletionLogProbs(BaseModel):
    """OpenAI's legacy completions logprobs (parallel lists, one entry per token)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------- chat completions


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`. `logprobs: true` (+ `top_logprobs: k`) returns OpenAI's
    `choices[i].logprobs.content` list, one entry per generated token."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, description="default: what fits max_model_len")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM extensions
    add_generation_prompt: bool = True


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatLogProbContent] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed chat completion."""

    # Repeats CompletionStreamResponse's fields on purpose: each class mirrors its own OpenAI
    # schema, and a shared base would put its fields first and so reorder the JSON keys.
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# --------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "opd"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
