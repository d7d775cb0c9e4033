"""Where a replica's end of a weight-broadcast group lives: in the service or in the engine.

`BroadcastManager` (`services.student_rollout.broadcast`) runs the routes' state machine; a
transport joins one group, receives each broadcast and provides its swap step:

- `ServiceTransport`, for engines that take in-memory tensors (`load_weights_from_tensors`:
  hf). This process joins the group and receives into CPU staging tensors, each on a daemon
  thread of its own (a join or a bucket may block for the group's whole timeout); the swap
  step hands the tensors to the engine.
- `EngineTransport`, for engines with a `BroadcastReceiver` (vllm, whose model lives in vLLM's
  worker process). The engine joins and receives where its model is; the swap step commits
  what it staged there, `discard` drops it.

Both receive every bucket before anything changes, so the manager's atomicity holds for both.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from services.engine.base import BroadcastReceiver, Engine
from services.protocol import BroadcastBucket, BroadcastInitRequest, BroadcastRequest
from services.student_rollout.broadcast_group import (
    BroadcastCancelled,
    describe_error,
    join_group,
    receive_buckets,
)

logger = logging.getLogger("opd.student_rollout")

T = TypeVar("T")
SOURCE = "broadcast"
#: What a transport's join reports when it ends: the error, or None once joined.
Joined = Callable[[BaseException | None], None]
#: The swap step of one received broadcast (`WeightsManager.swap_in`'s `load`).
Swap = Callable[[], Awaitable[None]]
# Leave calls in flight (the loop keeps weak references only).
_LEAVING: set[asyncio.Task[None]] = set()


def in_thread(
    fn: Callable[[], T], then: Callable[[BaseException | None, Any], None] | None = None
) -> asyncio.Future[T]:
    """Run blocking `fn` on a daemon thread of its own; its result as an asyncio future.

    Not the default executor: a join or a bucket may block for the group's whole timeout.
    `then(error, result)` runs on the loop just before the future is settled, so whoever sees
    the future done also sees what `then` did.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if then is not None:
            then(None if ok else value, value if ok else None)
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            value, ok = fn(), True
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            value, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name="opd-weights-broadcast", daemon=True).start()
    return future


@dataclass(frozen=True)
class Job:
    """One broadcast being received."""

    req: BroadcastRequest
    plan: list[BroadcastBucket]
    generation: int
    backend: str
    device: torch.device
    cancel: threading.Event
    started: float


class Transport(abc.ABC):
    """One group's worth of joining and receiving (see the module doc)."""

    @abc.abstractmethod
    def join(
        self, req: BroadcastInitRequest, host: str, device: torch.device, then: Joined
    ) -> asyncio.Future[Any]:
        """Start joining; `then(error)` runs on the loop when it ends, before the future does."""

    @abc.abstractmethod
    async def receive(self, job: Job, progress: Callable[[int], None]) -> Swap:
        """Receive every bucket of `job` (`progress(n)`: n buckets are in); its swap step."""

    async def discard(self) -> None:  # noqa: B027 - nothing to drop by default
        """Drop what `receive` staged and will not be swapped in (idempotent)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop this end of the group (idempotent; a receive in flight fails or ends first)."""


class ServiceTransport(Transport):
    """The group joined by this process; received tensors go to `load_weights_from_tensors`.

    The group is dropped by dropping every reference to it (`broadcast_group`): `close` drops
    this object's, a receive in flight holds the last one until it ends.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._store: Any = None
        self._group: Any = None
        self._closed = False

    def join(
        self, req: BroadcastInitRequest, host: str, device: torch.device, then: Joined
    ) -> asyncio.Future[Any]:
        """Join on a thread of its own (it completes when every rank is in)."""

        def joined(exc: BaseException | None, result: tuple[Any, Any] | None) -> None:
            if exc is None and result is not None and not self._closed:
                self._store, self._group = result
            then(exc)

        return in_thread(lambda: join_group(req, host=host, device=device), joined)

    async def receive(self, job: Job, progress: Callable[[int], None]) -> Swap:
        """Every bucket into CPU staging tensors, on a thread of its own."""
        staging = await in_thread(lambda: self._receive(job, progress))
        tensors = {t.name: staging[i] for i, t in enumerate(job.req.tensors)}
        engine = self.engine

        async def swap() -> None:
            await engine.load_weights_from_tensors(tensors, SOURCE)

        return swap

    def _receive(self, job: Job, progress: Callable[[int], None]) -> list[torch.Tensor]:
        group = self._group  # with `close` called, this frame holds the last reference
        if group is None:
            raise BroadcastCancelled("the group was dropped before the broadcast began")
        return receive_buckets(
            group,
            job.req.tensors,
            job.plan,
            backend=job.backend,
            device=job.device,
            cancel=job.cancel,
            progress=progress,
        )

    def close(self) -> None:
        """Drop this object's references to the group (its connections close once unused)."""
        self._closed = True
        self._group = self._store = None


class EngineTransport(Transport):
    """The group joined by the engine's `BroadcastReceiver`, where the model lives.

    A receive is one call into the engine, so progress is known only when it ends; `close`
    queues the receiver's `leave`, which the receiver runs after any call already under way
    (its calls run one at a time, in order, so a later join is never undone by it).
    """

    def __init__(self, receiver: BroadcastReceiver) -> None:
        self.receiver = receiver
        self._closed = False

    def join(
        self, req: BroadcastInitRequest, host: str, device: torch.device, then: Joined
    ) -> asyncio.Future[Any]:
        """Join through the receiver (it blocks the engine until every rank is in)."""

        async def run() -> None:
            try:
                await self.receiver.join(req, host)
            except BaseException as exc:  # noqa: BLE001 - reported through `then`
                then(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            then(None)

        return asyncio.ensure_future(run())

    async def receive(self, job: Job, progress: Callable[[int], None]) -> Swap:
        """The receiver takes every bucket into its staging; the swap step commits them."""
        await self.receiver.receive(job.req)
        progress(len(job.plan))
        return self.receiver.commit

    async def discard(self) -> None:
        """The receiver drops its staging."""
        await self.receiver.discard()

    def close(self) -> None:
        """Queue the receiver's `leave` (nothing to do once the event loop is gone)."""
        if self._closed:
            return
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._leave())
        _LEAVING.add(task)
        task.add_done_callback(_LEAVING.discard)

    async def _leave(self) -> None:
        try:
            await self.receiver.leave()
        except Exception as exc:  # noqa: BLE001 - the next join replaces the group anyway
            logger.warning("weight broadcast: leaving the group failed: %s", describe_error(exc))


def transport_unsupported(engine: Engine) -> str | None:
    """None when `make_transport(engine)` works; else why this engine takes no broadcasts."""
    receiver = engine.broadcast_receiver()
    return receiver.unsupported() if receiver is not None else engine.tensor_weights_unsupported()


def make_transport(engine: Engine) -> Transport:
    """The engine's own receiver when it has one, else this process receives for it."""
    receiver = engine.broadcast_receiver()
    return EngineTransport(receiver) if receiver is not None else ServiceTransport(engine)
