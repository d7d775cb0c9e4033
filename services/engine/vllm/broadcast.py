"""Weight broadcasts on the vllm backend: the engine's `BroadcastReceiver`.

The model lives in vLLM's worker process, so that is where this replica's end of the trainer's
group must be: the worker's weight-transfer engine (`weight_transfer`) joins and receives, and
this class drives it through vLLM's weight-transfer API (`AsyncLLM.init_weight_transfer_engine`,
`start_weight_update` / `update_weights` / `finish_weight_update`,
`shutdown_weight_transfer_engine`). It needs vLLM started with that engine
(`EngineConfig.weight_transfer`, which the rollout service sets) and one worker
(`tensor_parallel_size` 1: the group gives each replica one rank).

Every call holds `ServedWeights.lock`, so calls reach the worker one at a time and in order.
Each call runs inside vLLM's engine core: while a join or a receive waits for the trainer,
the engine takes no step, so requests in flight pause (they are not lost) and new ones queue;
the swap itself (`commit`) is the disk path's: pause after in-flight requests finished, load,
reset the prefix cache, resume.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..base import BroadcastReceiver
from .transfer import failure, run_action
from .transfer_wire import Discard, JoinInfo, Receive

if TYPE_CHECKING:
    from services.protocol import BroadcastInitRequest, BroadcastRequest

    from .engine import VLLMEngine


class VLLMBroadcastReceiver(BroadcastReceiver):
    """Drives the worker's `BroadcastWeightTransferEngine` (see the module doc)."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine

    def unsupported(self) -> str | None:
        """Why this engine takes no broadcasts as started (None: it does)."""
        config = self.engine.config
        if not config.weight_transfer:
            return (
                "the vllm engine was started without vLLM's weight transfer "
                "(EngineConfig.weight_transfer; the rollout service turns it on)"
            )
        if config.tensor_parallel_size != 1:
            return (
                f"weights by broadcast need tensor_parallel_size 1 on the vllm backend "
                f"(this engine runs {config.tensor_parallel_size} workers; the group "
                "gives each replica one rank)"
            )
        return None

    async def join(self, init: BroadcastInitRequest, host: str) -> None:
        """The worker joins the group (the engine core waits until every rank is in)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        llm = self.engine.llm
        request = WeightTransferInitRequest(
            init_info=JoinInfo(init=init, host=host).model_dump(mode="json")
        )
        await self._locked(lambda: llm.init_weight_transfer_engine(request))

    async def receive(self, request: BroadcastRequest) -> None:
        """The worker receives and checks every bucket; the model is untouched."""
        llm = self.engine.llm
        async with self.engine.weights.lock:
            await run_action(llm, Receive(request=request))

    async def commit(self) -> None:
        """Swap the received weights in (`ServedWeights.commit_broadcast`)."""
        await self.engine.weights.commit_broadcast(self.engine.llm)

    async def discard(self) -> None:
        """The worker drops its staging (nothing to do once the engine stopped)."""
        if not self.engine.running:
            return
        llm = self.engine.llm
        async with self.engine.weights.lock:
            await run_action(llm, Discard())

    async def leave(self) -> None:
        """The worker drops the group (nothing to do once the engine stopped)."""
        if not self.engine.running:
            return
        await self._locked(self.engine.llm.shutdown_weight_transfer_engine)

    async def _locked(self, call: Callable[[], Awaitable[object]]) -> None:
        """One call into vLLM's weight-transfer API under the weights lock; a worker failure
        comes out as `failure(...)` of it."""
        async with self.engine.weights.lock:
            try:
                await call()
            except Exception as exc:
                raise failure(exc) from exc
