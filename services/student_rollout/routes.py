"""`POST /v1/rollouts`: `n` trajectories per prompt with sampled-token logprobs (docs/design.md §3).

Prompts come in three forms, tokenized exactly as the teacher and the OpenAI routes do it
(`services.engine.tokenization`): `messages` (chat template with the generation prompt, no
extra special tokens), `prompt` (text, special tokens as the tokenizer adds them) or
`token_ids` (used as given). Each answer item carries the prompt's ids, so the trainer can hand
the teacher exactly the ids the student saw.

Validation happens before any engine work; every refusal is a 400 naming the field and the
prompt index. A prompt whose length plus `max_tokens` exceeds `max_model_len` is **refused,
not clamped**: silently shortening `max_tokens` would change the `finish_reason: length`
statistics (the truncation rate the trainer logs) without anyone asking for it.

The engine call runs under a read lease of the policy version (`versioning.py`): all
trajectories of one request come from one set of weights, reported as `policy_version`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.common.app import ServiceState, get_state
from services.common.errors import APIError
from services.common.limits import check_length, check_limit, check_not_empty, check_token_ids
from services.common.openai_routes import check_model, generate, parse_stops
from services.common.openapi import error_responses
from services.common.responses import json_response
from services.engine import tokenization
from services.engine.base import Engine, SamplingSpec
from services.protocol import (
    RolloutItem,
    RolloutPrompt,
    RolloutRequest,
    RolloutResponse,
    RolloutUsage,
    encode_array,
)
from services.student_rollout.versioning import PolicyVersions, unwrap_engine

# Temperatures below this are greedy (the engines' convention, vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5


def prompt_ids(engine: Engine, prompt: RolloutPrompt, index: int) -> list[int]:
    """Token ids of one request prompt, any form; 400s name `prompts[index].<field>`."""
    where = f"prompts[{index}]"
    tok = engine.tokenizer
    if prompt.token_ids is not None:
        field, ids = "token_ids", list(prompt.token_ids)
    elif prompt.messages is not None:
        field = "messages"
        check_not_empty(prompt.messages, name=f"{where}.messages")
        try:
            ids = tokenization.chat_prompt_ids(tok, prompt.messages)
        except Exception as exc:  # noqa: BLE001 - jinja raises many types for bad conversations
            raise APIError(
                400,
                f"{where}.messages: the chat template could not be applied: {exc}",
                param=f"prompts.{index}.messages",
                code="chat_template_error",
            ) from exc
    else:
        assert prompt.prompt is not None  # protocol's validator: exactly one form
        field, ids = "prompt", tokenization.text_prompt_ids(tok, prompt.prompt)
    if not ids:
        raise APIError(
            400,
            f"{where}.{field}: the prompt is empty (no tokens); generation needs at least one "
            "prompt token",
            param=f"prompts.{index}.{field}",
            code="empty",
        )
    return ids


def validate_request(
    state: ServiceState, engine: Engine, req: RolloutRequest
) -> tuple[list[list[int]], SamplingSpec]:
    """Tokenize and check a request; `(prompt ids, sampling spec)` or a 400 naming the field."""
    settings = state.settings
    info = state.engine_info
    assert info is not None
    check_not_empty(req.prompts, name="prompts")
    check_limit(req.n, settings.max_n, name="n", setting="max_n")
    check_limit(
        len(req.prompts) * req.n,
        settings.max_sequences_per_request,
        name="len(prompts) x n",
        setting="max_sequences_per_request",
        param="prompts",
    )
    if req.top_k > info.vocab_size:
        raise APIError(
            400,
            f"top_k: {req.top_k} is larger than the vocabulary ({info.vocab_size}); "
            "use -1 for no top-k filter",
            param="top_k",
        )
    stops = parse_stops(req.stop)

    prompts: list[list[int]] = []
    total = 0
    for i, prompt in enumerate(req.prompts):
        ids = prompt_ids(engine, prompt, i)
        field = (
            "token_ids"
            if prompt.token_ids is not None
            else ("messages" if prompt.messages is not None else "prompt")
        )
        check_token_ids(
            ids, info.vocab_size, name=f"prompts[{i}].token_ids", param=f"prompts.{i}.token_ids"
        )
        check_length(
            len(ids) + req.max_tokens,
            info.max_model_len,
            name=f"prompts[{i}]",
            param=f"prompts.{i}.{field}" if len(ids) >= info.max_model_len else "max_tokens",
            what=f"tokens ({len(ids)} prompt + {req.max_tokens} max_tokens)",
        )
        total += len(ids) + req.n * req.max_tokens
        prompts.append(ids)
    check_limit(
        total,
        settings.max_tokens_per_request,
        name="tokens in request (prompt tokens + n x max_tokens per prompt)",
        setting="max_tokens_per_request",
        param="prompts",
    )
    spec = SamplingSpec(
        n=req.n,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        # 0 means "no filter" as in vLLM and the OpenAI routes (transformers would keep nothing).
        top_k=-1 if req.top_k == 0 else req.top_k,
        seed=req.seed,
        stop=stops,
    )
    return prompts, spec


async def run_rollouts(
    state: ServiceState, engine: Engine, versions: PolicyVersions, req: RolloutRequest
) -> RolloutResponse:
    """Validate, generate under one policy version, and build the response."""
    model = check_model(state, req.model)
    prompts, spec = validate_request(state, engine, req)
    state.metrics.prompt_tokens(sum(map(len, prompts)))
    copies = 1
    if spec.temperature < GREEDY_EPS and spec.n > 1:
        # Greedy samples of one prompt are identical: compute one, return it n times. Saves
        # n-1 generations, and some backends (vLLM) refuse greedy with n > 1 outright.
        copies, spec = spec.n, dataclasses.replace(spec, n=1)
    # One lease over the single engine call: the version cannot change while it runs.
    async with versions.serving() as version:
        samples = await generate(state, engine, prompts, spec)
    if copies > 1:
        samples = [[per[0]] * copies for per in samples]

    items: list[RolloutItem] = []
    completion_tokens = 0
    for i, (ids, per_prompt) in enumerate(zip(prompts, samples, strict=True)):
        # Encode each prompt once; its n items share the object.
        prompt_field: Any = encode_array(ids, "int32", req.encoding)
        for j, sample in enumerate(per_prompt):
            completion_tokens += len(sample.token_ids)
            items.append(
                RolloutItem(
                    prompt_index=i,
                    sample_index=j,
                    prompt_token_ids=prompt_field,
                    token_ids=encode_array(sample.token_ids, "int32", req.encoding),
                    logprobs=encode_array(sample.logprobs, "float32", req.encoding),
                    text=sample.text,
                    finish_reason=sample.finish_reason,
                    policy_version=version,
                )
            )
    state.metrics.rollouts(len(items))
    return RolloutResponse(
        model=model,
        policy_version=version,
        data=items,
        usage=RolloutUsage(
            prompt_tokens=sum(map(len, prompts)), completion_tokens=completion_tokens
        ),
    )


def rollout_router() -> APIRouter:
    """The `/v1/rollouts` route (the app puts a `PolicyVersions` on `app.state.versions`)."""
    router = APIRouter(tags=["rollout"])

    @router.post("/v1/rollouts", response_model=RolloutResponse,
                 responses=error_responses(400, 404, 503))
    async def rollouts(body: RolloutRequest, request: Request) -> Response:
        """`n` samples per prompt with each sampled token's logprob and the policy version."""
        state = get_state(request)
        # The raw engine: run_rollouts takes its own lease (see LeasedEngine).
        engine = unwrap_engine(state.require_engine())
        resp = await run_rollouts(state, engine, request.app.state.versions, body)
        return json_response(resp)

    return router
