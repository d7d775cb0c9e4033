"""OpenAI-compatible routes shared by both services: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`.

```python
app = create_app(settings, service="teacher", routers=[teacher_router(), openai_router()])
```

Conventions (vLLM's, so vLLM clients work unchanged):

- `echo: true, max_tokens: 0, logprobs: k` on `/v1/completions` scores the prompt: each token's
  logprob given the tokens before it (the first token has none: `null`) and the top-k
  alternatives (`top_logprobs[i]` holds the k most likely tokens plus the actual one). These are
  the numbers the teacher's `/v1/score` returns (same engine call), at the request's
  `temperature` (default 1; 0 counts as 1 here since greedy has no distribution of its own).
- `echo` with generation returns prompt + completion text and, with `logprobs`, both parts'
  logprobs.
- `n` choices per prompt are numbered `prompt_index * n + sample_index`.
- `usage.prompt_tokens` counts each prompt once (not n times).
- `return_tokens_as_token_ids: true` writes tokens as `token_id:<id>`, which makes
  `top_logprobs` keys unique (two ids can decode to the same text).
- `stream: true` is answered as server-sent events, but the engine interface is not
  incremental: the events come after the whole generation (one chunk per choice), then
  `data: [DONE]`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.common.app import ServiceState, StateDep, get_state
from services.common.errors import APIError
from services.common.limits import (
    check_length,
    check_limit,
    check_not_empty,
    check_token_ids,
)
from services.common.openapi import error_responses
from services.common.responses import openai_response
from services.engine import tokenization
from services.engine.base import Engine, GeneratedSample, SamplingSpec, ScoreInput, ScoreResult
from services.openai_protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProb,
    ChatLogProbContent,
    ChatLogProbs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)

# JSON has no -inf; OpenAI and vLLM send this instead.
MIN_LOGPROB = -9999.0


# --------------------------------------------------------------------------- token text


class TokenDecoder:
    """Token id -> its text, cached (per-token `decode` is slow and is called per position)."""

    _cache: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        try:
            self.table = self._cache.setdefault(tokenizer, {})
        except TypeError:  # tokenizer not weak-referenceable: no cache across requests
            self.table = {}

    def __call__(self, token_id: int) -> str:
        """The token's text (`token_id:<id>` when `as_ids`)."""
        if self.as_ids:
            return f"token_id:{token_id}"
        text = self.table.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self.table[token_id] = text
        return text


def _lp(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


# --------------------------------------------------------------------------- shared checks


def check_model(state: ServiceState, requested: str | None) -> str:
    """The served model name; 404 when the request names another model."""
    served = state.served_model_name()
    if requested is None or requested in (served, state.settings.model):
        return served
    raise APIError(404, f"model: {requested!r} is not served here (this server serves "
                        f"{served!r})", param="model", code="model_not_found")


def _unsupported(field: str, why: str = "is not supported by this server") -> APIError:
    return APIError(400, f"{field}: {why}", param=field, code="unsupported")


def _check_sampling(state: ServiceState, req: CompletionRequest | ChatCompletionRequest) -> None:
    s = state.settings
    if req.presence_penalty:
        raise _unsupported("presence_penalty")
    if req.frequency_penalty:
        raise _unsupported("frequency_penalty")
    if req.logit_bias:
        raise _unsupported("logit_bias")
    check_limit(req.n, s.max_n, name="n", setting="max_n")
    if req.top_k is not None and req.top_k > 0 and state.engine_info is not None:
        check_limit(req.top_k, state.engine_info.vocab_size, name="top_k",
                    setting="vocab_size")


def parse_stops(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop` (a string, a list or null) as a tuple; an empty stop string is a 400."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for i, s in enumerate(stops):
        if not s:
            raise APIError(400, f"stop[{i}]: a stop string must not be empty", param="stop")
    return stops


def sampling_spec(req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                  top_logprobs: int) -> SamplingSpec:
    """The engine's sampling parameters for an OpenAI request."""
    return SamplingSpec(
        n=req.n,
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k in (None, 0) else int(req.top_k),
        seed=req.seed,
        stop=parse_stops(req.stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        top_logprobs=top_logprobs,
    )


def _check_prompts(state: ServiceState, prompts: Sequence[list[int]], *, name: str,
                   max_tokens: int, n: int, single: bool) -> None:
    """Vocabulary, length and count checks of tokenized prompts (`single`: no index)."""
    info = state.engine_info
    assert info is not None
    s = state.settings
    check_limit(len(prompts) * n, s.max_sequences_per_request, name=f"{name} x n",
                setting="max_sequences_per_request", param=name)
    total = 0
    for i, ids in enumerate(prompts):
        where = name if single else f"{name}[{i}]"
        check_not_empty(ids, name=where, param=name)
        check_token_ids(ids, info.vocab_size, name=where, param=name)
        check_length(len(ids) + max_tokens, info.max_model_len, name=where, param=name,
                     what=f"tokens ({len(ids)} prompt + {max_tokens} max_tokens)")
        total += len(ids) + n * max_tokens
    check_limit(total, s.max_tokens_per_request, name="tokens in request",
                setting="max_tokens_per_request", param=name)


async def score_prompts(state: ServiceState, engine: Engine, prompts: Sequence[list[int]],
                        top_k: int, temperature: float) -> list[ScoreResult | None]:
    """Logprobs of every prompt token after the first (None for one-token prompts)."""
    todo = [i for i, ids in enumerate(prompts) if len(ids) >= 2]
    out: list[ScoreResult | None] = [None] * len(prompts)
    if todo:
        inputs = [ScoreInput(token_ids=list(prompts[i]), start=1, top_k=top_k,
                             temperature=temperature) for i in todo]
        state.metrics.engine_batch("score", len(inputs))
        results = await engine.score(inputs)
        for i, res in zip(todo, results, strict=True):
            out[i] = res
        state.metrics.tokens_scored(sum(len(prompts[i]) - 1 for i in todo))
    return out


async def generate(state: ServiceState, engine: Engine, prompts: Sequence[list[int]],
                   spec: SamplingSpec) -> list[list[GeneratedSample]]:
    """`engine.generate` with metrics."""
    state.metrics.engine_batch("generate", len(prompts) * spec.n)
    samples = await engine.generate(prompts, spec)
    state.metrics.tokens_generated(sum(len(s.token_ids) for per in samples for s in per))
    return samples


# --------------------------------------------------------------------------- completions


def _prompt_ids(state: ServiceState, engine: Engine, req: CompletionRequest
                ) -> tuple[list[list[int]], list[str | None], bool]:
    """(token ids per prompt, original text per prompt or None, single prompt?)."""
    prompt = req.prompt
    tok = engine.tokenizer
    if isinstance(prompt, str):
        texts: list[str | None] = [prompt]
        single = True
    elif len(prompt) == 0:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="empty")
    elif isinstance(prompt[0], str):
        texts = list(prompt)  # type: ignore[arg-type]
        single = False
    elif isinstance(prompt[0], int):
        return [list(prompt)], [None], True  # type: ignore[arg-type]
    else:
        return [list(p) for p in prompt], [None] * len(prompt), False  # type: ignore[arg-type]
    ids = [tokenization.encode_text(tok, t or "", add_special_tokens=req.add_special_tokens)
           for t in texts]
    return ids, texts, single


def _prompt_part(decode: TokenDecoder, ids: list[int], scored: ScoreResult | None,
                 ) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """Completion-logprobs lists for echoed prompt tokens (first token: null)."""
    tokens = [decode(t) for t in ids]
    lps: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    if scored is not None:
        values = scored.logprobs.tolist()
        top_ids = scored.top_token_ids.tolist() if scored.top_token_ids is not None else None
        top_lps = scored.top_logprobs.tolist() if scored.top_logprobs is not None else None
        for pos, value in enumerate(values):
            lps.append(_lp(value))
            entry: dict[str, float] = {}
            if top_ids is not None and top_lps is not None:
                for tid, tlp in zip(top_ids[pos], top_lps[pos], strict=True):
                    entry[decode(tid)] = _lp(tlp)
            entry.setdefault(decode(ids[pos + 1]), _lp(value))
            tops.append(entry)
    return tokens, lps, tops


def _sample_part(decode: TokenDecoder, sample: GeneratedSample, k: int
                 ) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """Completion-logprobs lists for generated tokens (sampled token + top-k)."""
    tokens = [decode(t) for t in sample.token_ids]
    lps: list[float | None] = [_lp(v) for v in sample.logprobs]
    tops: list[dict[str, float] | None] = []
    for pos, tid in enumerate(sample.token_ids):
        entry: dict[str, float] = {}
        if k > 0 and sample.top_logprobs is not None and pos < len(sample.top_logprobs):
            ranked = sorted(sample.top_logprobs[pos].items(), key=lambda kv: -kv[1])[:k]
            entry = {decode(t): _lp(v) for t, v in ranked}
        entry.setdefault(decode(tid), _lp(sample.logprobs[pos]))
        tops.append(entry)
    return tokens, lps, tops


def _completion_logprobs(tokens: list[str], lps: list[float | None],
                         tops: list[dict[str, float] | None], start_offset: int = 0
                         ) -> CompletionLogProbs:
    offsets, offset = [], start_offset
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogProbs(text_offset=offsets, token_logprobs=lps, tokens=tokens,
                              top_logprobs=tops)


async def create_completion(state: ServiceState, engine: Engine, req: CompletionRequest
                            ) -> CompletionResponse:
    """Serve one `/v1/completions` request (validated body -> response model)."""
    model = check_model(state, req.model)
    if req.suffix:
        raise _unsupported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _unsupported("best_of", "must equal n (no server-side best-of ranking)")
    _check_sampling(state, req)
    k = req.logprobs
    if k is not None:
        check_limit(k, state.settings.max_top_k, name="logprobs", setting="max_top_k")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 is only meaningful with echo: true (prompt scoring)",
                       param="max_tokens")
    prompts, texts, single = _prompt_ids(state, engine, req)
    _check_prompts(state, prompts, name="prompt", max_tokens=max_tokens, n=req.n, single=single)
    state.metrics.prompt_tokens(sum(map(len, prompts)))

    scored: list[ScoreResult | None] = [None] * len(prompts)
    if req.echo and k is not None:
        temperature = req.temperature if req.temperature else 1.0
        scored = await score_prompts(state, engine, prompts, k, temperature)
    samples: list[list[GeneratedSample]] | None = None
    if max_tokens > 0:
        samples = await generate(state, engine, prompts,
                                 sampling_spec(req, max_tokens, top_logprobs=k or 0))

    decode = TokenDecoder(engine.tokenizer, as_ids=req.return_tokens_as_token_ids)
    choices: list[CompletionChoice] = []
    completion_tokens = 0
    for i, ids in enumerate(prompts):
        prompt_text = ""
        prompt_lp: tuple[list[str], list[float | None], list[dict[str, float] | None]] | None
        prompt_lp = None
        if req.echo:
            prompt_text = texts[i] if texts[i] is not None else tokenization.decode(
                engine.tokenizer, ids)
            if k is not None:
                prompt_lp = _prompt_part(decode, ids, scored[i])
        for j in range(req.n):
            text, finish, stop_reason = prompt_text, "length", None
            logprobs = None
            if samples is not None:
                sample = samples[i][j]
                text += sample.text
                finish, stop_reason = sample.finish_reason, sample.stop_reason
                completion_tokens += len(sample.token_ids)
                if k is not None:
                    gen = _sample_part(decode, sample, k)
                    if prompt_lp is not None:
                        gen = (prompt_lp[0] + gen[0], prompt_lp[1] + gen[1],
                               prompt_lp[2] + gen[2])
                    logprobs = _completion_logprobs(*gen)
            elif prompt_lp is not None:
                logprobs = _completion_logprobs(*prompt_lp)
            choices.append(CompletionChoice(index=i * req.n + j, text=text, logprobs=logprobs,
                                            finish_reason=finish, stop_reason=stop_reason))
    prompt_tokens = sum(map(len, prompts))
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    return CompletionResponse(model=model, choices=choices, usage=usage)


# --------------------------------------------------------------------------- chat


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprobs(decode: TokenDecoder, sample: GeneratedSample, k: int) -> ChatLogProbs:
    content = []
    for pos, tid in enumerate(sample.token_ids):
        tops: list[ChatLogProb] = []
        if k > 0 and sample.top_logprobs is not None and pos < len(sample.top_logprobs):
            ranked = sorted(sample.top_logprobs[pos].items(), key=lambda kv: -kv[1])[:k]
            for t, v in ranked:
                text = decode(t)
                tops.append(ChatLogProb(token=text, logprob=_lp(v), bytes=_token_bytes(text)))
        text = decode(tid)
        content.append(ChatLogProbContent(token=text, logprob=_lp(sample.logprobs[pos]),
                                          bytes=_token_bytes(text), top_logprobs=tops))
    return ChatLogProbs(content=content)


def chat_prompt_ids(engine: Engine, req: ChatCompletionRequest) -> list[int]:
    """The chat template applied to `messages` (400 naming `messages` when it cannot be)."""
    check_not_empty(req.messages, name="messages")
    try:
        text = tokenization.render_chat(engine.tokenizer, req.messages,
                                        add_generation_prompt=req.add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises many types for bad conversations
        raise APIError(400, f"messages: the chat template could not be applied: {exc}",
                       param="messages", code="chat_template_error") from exc
    return tokenization.encode_text(engine.tokenizer, text, add_special_tokens=False)


async def create_chat_completion(state: ServiceState, engine: Engine,
                                 req: ChatCompletionRequest) -> ChatCompletionResponse:
    """Serve one `/v1/chat/completions` request (validated body -> response model)."""
    model = check_model(state, req.model)
    if req.tools:
        raise _unsupported("tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "only {'type': 'text'} is supported")
    _check_sampling(state, req)
    k = 0
    if req.top_logprobs is not None:
        if not req.logprobs and req.top_logprobs > 0:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        check_limit(req.top_logprobs, state.settings.max_top_k, name="top_logprobs",
                    setting="max_top_k")
        k = req.top_logprobs
    ids = chat_prompt_ids(engine, req)
    info = state.engine_info
    assert info is not None
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = max(info.max_model_len - len(ids), 0)
        if max_tokens == 0:
            check_length(len(ids) + 1, info.max_model_len, name="messages")
    _check_prompts(state, [ids], name="messages", max_tokens=max_tokens, n=req.n, single=True)
    state.metrics.prompt_tokens(len(ids))
    samples = (await generate(state, engine, [ids], sampling_spec(req, max_tokens, k)))[0]
    decode = TokenDecoder(engine.tokenizer)
    choices = []
    for j, sample in enumerate(samples):
        choices.append(ChatCompletionChoice(
            index=j,
            message=ChatResponseMessage(content=sample.text),
            logprobs=_chat_logprobs(decode, sample, k) if req.logprobs else None,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        ))
    completion_tokens = sum(len(s.token_ids) for s in samples)
    usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                      total_tokens=len(ids) + completion_tokens)
    return ChatCompletionResponse(model=model, choices=choices, usage=usage)


# --------------------------------------------------------------------------- router


def _model_card(state: ServiceState) -> ModelCard:
    """The served model's card (`/v1/models` and `/v1/models/{id}`)."""
    info = state.engine_info
    assert info is not None
    return ModelCard(id=info.served_model_name, root=info.model,
                     created=int(state.ready_at or time.time()),
                     max_model_len=info.max_model_len)


# `stream: true` answers 200 with server-sent events instead of the JSON body.
_STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion (JSON), or with `stream: true` server-sent events: "
                         "`data: <chunk JSON>` lines ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}


def openai_router() -> APIRouter:
    """The OpenAI-compatible routes (mount with `create_app(..., routers=[...])`)."""
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models", response_model=ModelList, responses=error_responses(503))
    async def list_models(state: StateDep) -> ModelList:
        """The one served model."""
        state.require_engine()
        return ModelList(data=[_model_card(state)])

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard,
                responses=error_responses(404, 503))
    async def get_model(model_id: str, state: StateDep) -> ModelCard:
        """One model card (404 for any other name)."""
        state.require_engine()
        card = _model_card(state)
        if model_id not in (card.id, card.root):
            raise APIError(404, f"model: {model_id!r} is not served here",
                           param="model", code="model_not_found")
        return card

    @router.post("/v1/completions", response_model=CompletionResponse,
                 responses=error_responses(400, 404, 503, extra=_STREAM_200))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI completions; `echo + max_tokens: 0 + logprobs: k` scores the prompt."""
        state = get_state(request)
        engine = state.require_engine()
        return openai_response(body, await create_completion(state, engine, body))

    # Shaped like the route above only: what differs lives in create_chat_completion.
    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                 responses=error_responses(400, 404, 503, extra=_STREAM_200))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions with `logprobs` / `top_logprobs`."""
        state = get_state(request)
        engine = state.require_engine()
        return openai_response(body, await create_chat_completion(state, engine, body))

    return router


__all__ = [
    "TokenDecoder",
    "check_model",
    "create_chat_completion",
    "create_completion",
    "generate",
    "openai_router",
    "parse_stops",
    "sampling_spec",
    "score_prompts",
]
