"""`POST /v1/score`: the teacher's logprob of given tokens (docs/design.md §3).

For a token-id sequence, `logprobs[i] = log p(token_ids[start+i] | token_ids[:start+i])` at
the request's temperature (logits / T before the log-softmax), for every position from
`start` (>= 1, default 1) to the end.

Text forms are tokenized here, with the prompt and the completion encoded *separately* and
the ids concatenated (`services.engine.tokenization.prompt_completion_ids`):

- `{"prompt", "completion"}`: prompt encoded as a completions prompt (BOS where the tokenizer
  adds one), completion without special tokens; `start = len(prompt_ids)`;
- `{"messages", "completion"}`: the chat template with the generation prompt, then the
  completion the same way.

Encoding the two apart keeps the boundary exact: the scored tokens are precisely the
completion's own tokens, which is what a student sampling after that prompt produces (encoding
`prompt + completion` as one string could merge a token across the boundary and shift
`start`). The answer's `token_ids` shows the ids that were scored.

All sequences of a request go to the engine in one call, so the engine can batch them.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.common.app import ServiceState, get_state
from services.common.errors import APIError
from services.common.limits import check_length, check_limit, check_not_empty, check_token_ids
from services.common.openai_routes import check_model
from services.common.openapi import error_responses
from services.common.responses import json_response
from services.engine import tokenization
from services.engine.base import Engine, ScoreInput, ScoreResult
from services.protocol import (
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    ScoreUsage,
    encode_array,
)


def sequence_ids(engine: Engine, seq: ScoreSequence, index: int) -> tuple[list[int], int]:
    """`(token_ids, start)` of one request sequence, any form (400s name `sequences[index]`)."""
    where = f"sequences[{index}]"
    tok = engine.tokenizer
    if seq.token_ids is not None:
        ids = seq.token_ids
        check_not_empty(ids, name=f"{where}.token_ids")
        start = 1 if seq.start is None else seq.start
        if not 1 <= start < len(ids):
            raise APIError(
                400,
                f"{where}.start: {start} is out of range; it must be >= 1 (the first token has "
                f"no prefix to be scored from) and < len(token_ids) = {len(ids)}",
                param=f"sequences.{index}.start", code="invalid_start",
            )
        return ids, start
    assert seq.completion is not None  # protocol's validator: text forms carry a completion
    if seq.messages is not None:
        check_not_empty(seq.messages, name=f"{where}.messages")
        try:
            prompt_ids = tokenization.chat_prompt_ids(tok, seq.messages)
        except Exception as exc:  # noqa: BLE001 - jinja raises many types
            raise APIError(400, f"{where}.messages: the chat template could not be applied: "
                                f"{exc}", param=f"sequences.{index}.messages",
                           code="chat_template_error") from exc
        prompt_field = "messages"
    else:
        assert seq.prompt is not None
        prompt_ids = tokenization.text_prompt_ids(tok, seq.prompt)
        prompt_field = "prompt"
    if not prompt_ids:
        raise APIError(400, f"{where}.{prompt_field}: tokenizes to no tokens; the first "
                            "completion token needs a prefix to be scored from",
                       param=f"sequences.{index}.{prompt_field}", code="empty")
    ids, start = tokenization.prompt_completion_ids(tok, prompt_ids, seq.completion)
    if start >= len(ids):
        raise APIError(400, f"{where}.completion: tokenizes to no tokens; nothing to score",
                       param=f"sequences.{index}.completion", code="empty")
    return ids, start


def build_inputs(state: ServiceState, engine: Engine, req: ScoreRequest
                 ) -> tuple[list[ScoreInput], int]:
    """Validate a request against the limits and the model; `(engine inputs, total tokens)`."""
    s = state.settings
    info = state.engine_info
    assert info is not None
    check_not_empty(req.sequences, name="sequences")
    check_limit(len(req.sequences), s.max_sequences_per_request, name="sequences",
                setting="max_sequences_per_request")
    check_limit(req.top_k, s.max_top_k, name="top_k", setting="max_top_k")
    check_limit(req.top_k, info.vocab_size, name="top_k", setting="vocab_size")
    inputs: list[ScoreInput] = []
    total = 0
    for i, seq in enumerate(req.sequences):
        ids, start = sequence_ids(engine, seq, i)
        field = "token_ids" if seq.token_ids is not None else "completion"
        check_token_ids(ids, info.vocab_size, name=f"sequences[{i}].token_ids",
                        param=f"sequences.{i}.{field}")
        check_length(len(ids), info.max_model_len, name=f"sequences[{i}]",
                     param=f"sequences.{i}.{field}")
        total += len(ids)
        inputs.append(ScoreInput(token_ids=ids, start=start, top_k=req.top_k,
                                 temperature=req.temperature))
    check_limit(total, s.max_tokens_per_request, name="tokens in request (sum of lengths)",
                setting="max_tokens_per_request", param="sequences")
    return inputs, total


def build_response(model: str, req: ScoreRequest, inputs: Sequence[ScoreInput],
                   results: Sequence[ScoreResult], total: int) -> ScoreResponse:
    """Engine results -> the wire answer, arrays as JSON lists or base64 (`req.encoding`)."""
    enc = req.encoding
    data = []
    scored = 0
    for i, (inp, res) in enumerate(zip(inputs, results, strict=True)):
        scored += len(inp.token_ids) - inp.start
        # Our own numbers: model_construct skips validating long arrays once more.
        item = ScoreItem.model_construct(
            index=i,
            start=inp.start,
            token_ids=encode_array(inp.token_ids, "int32", enc),
            logprobs=encode_array(res.logprobs, "float32", enc),
            top_token_ids=None if res.top_token_ids is None or req.top_k == 0
            else encode_array(res.top_token_ids, "int32", enc),
            top_logprobs=None if res.top_logprobs is None or req.top_k == 0
            else encode_array(res.top_logprobs, "float32", enc),
        )
        data.append(item)
    return ScoreResponse.model_construct(
        object="score", model=model, data=data,
        usage=ScoreUsage(prompt_tokens=total, scored_tokens=scored),
    )


async def score(state: ServiceState, engine: Engine, req: ScoreRequest) -> ScoreResponse:
    """Serve one `/v1/score` request (validated body -> answer)."""
    model = check_model(state, req.model)
    inputs, total = build_inputs(state, engine, req)
    state.metrics.prompt_tokens(total)
    state.metrics.engine_batch("score", len(inputs))
    results = await engine.score(inputs)
    response = build_response(model, req, inputs, results, total)
    state.metrics.tokens_scored(response.usage.scored_tokens)
    return response


def score_router() -> APIRouter:
    """`POST /v1/score`."""
    router = APIRouter(tags=["teacher"])

    @router.post("/v1/score", response_model=ScoreResponse,
                 responses=error_responses(400, 404, 503))
    async def score_route(body: ScoreRequest, request: Request) -> Response:
        """Teacher logprobs of given tokens: token ids, prompt + completion, or messages +
        completion; optional top-k alternatives, temperature and base64 arrays."""
        state = get_state(request)
        engine = state.require_engine()
        response = await score(state, engine, body)
        return json_response(response)

    return router
