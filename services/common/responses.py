"""How routes turn their pydantic answers into HTTP responses.

- `json_response`: the JSON body written by pydantic-core (FastAPI's `jsonable_encoder` path is
  much slower on the long float lists of `/v1/score`, `/v1/rollouts` and logprobs);
- `openai_response`: an OpenAI completion or chat completion, as that JSON body or, with
  `stream: true`, as server-sent events. The engine interface is not incremental, so the events
  follow the whole generation: one chunk per choice (chat: role, content, finish), the usage
  chunk when `stream_options.include_usage`, then `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from services.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatDelta,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)

__all__ = ["json_response", "openai_response"]


def json_response(model: BaseModel) -> Response:
    """`model` as an `application/json` response, serialized by pydantic-core."""
    return Response(model.model_dump_json(), media_type="application/json")


def openai_response(body: CompletionRequest | ChatCompletionRequest,
                    resp: CompletionResponse | ChatCompletionResponse) -> Response:
    """`resp` as one JSON body, or as server-sent events when `body` asked to stream."""
    if not body.stream:
        return json_response(resp)
    include = bool(body.stream_options and body.stream_options.include_usage)
    events = (_stream_chat(resp, include) if isinstance(resp, ChatCompletionResponse)
              else _stream_completion(resp, include))
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


async def _stream_completion(resp: CompletionResponse, include_usage: bool
                             ) -> AsyncIterator[str]:
    for choice in resp.choices:
        yield _sse(CompletionStreamResponse(id=resp.id, created=resp.created, model=resp.model,
                                            choices=[choice]))
    if include_usage:
        yield _sse(CompletionStreamResponse(id=resp.id, created=resp.created, model=resp.model,
                                            choices=[], usage=resp.usage))
    yield _sse("[DONE]")


async def _stream_chat(resp: ChatCompletionResponse, include_usage: bool
                       ) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionStreamChoice],
              usage: UsageInfo | None = None) -> str:
        return _sse(ChatCompletionStreamResponse(id=resp.id, created=resp.created,
                                                 model=resp.model, choices=choices,
                                                 usage=usage))

    for c in resp.choices:
        yield chunk([ChatCompletionStreamChoice(index=c.index, delta=ChatDelta(role="assistant",
                                                                              content=""))])
        yield chunk([ChatCompletionStreamChoice(index=c.index,
                                                delta=ChatDelta(content=c.message.content),
                                                logprobs=c.logprobs)])
        yield chunk([ChatCompletionStreamChoice(index=c.index, delta=ChatDelta(),
                                                finish_reason=c.finish_reason)])
    if include_usage:
        yield chunk([], usage=resp.usage)
    yield _sse("[DONE]")
