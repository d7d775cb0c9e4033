"""The producer of the steps' batches (:func:`trainer.batches.make_batch`), running ahead.

:class:`BatchProducer` hands out step ``t``'s batch; with ``sync.max_staleness = K >= 1`` it
keeps the next K batches in flight on background threads while step ``t`` trains. The prompts
of each batch are drawn when it is *requested*, in the caller's thread, so the data order
never depends on timing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from trainer.batches import Batch, make_batch
from trainer.config import TrainConfig
from trainer.connections import Services
from trainer.data import PromptSampler
from trainer.teacher_context import TeacherContext

__all__ = ["BatchProducer"]


def _in_thread(fn: Callable[[], Batch]) -> Future[Batch]:
    """Run ``fn`` on a daemon thread (a stuck HTTP call must not block interpreter exit)."""
    future: Future[Batch] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the consumer, re-raised by .result()
            future.set_exception(exc)

    threading.Thread(target=target, name="opd-batch-producer", daemon=True).start()
    return future


class BatchProducer:
    """Hands out step ``t``'s batch; with ``max_staleness = K``, keeps K more in flight.

    Prompts are drawn in the caller's thread when a batch is *requested*, so the data order
    never depends on timing; the sampler position before each draw travels with the batch
    and is what a checkpoint stores (:meth:`next_sampler_state`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        services: Services,
        sampler: PromptSampler,
        last_step: int,
        start_step: int,
        context: TeacherContext,
        build: Callable[..., Batch] = make_batch,
    ):
        """``build``: what makes one batch, with :func:`make_batch`'s arguments (a seam for
        bench/pipeline.py to compare schedules)."""
        self.build = build
        self.cfg = cfg
        self.context = context
        self.services = services
        self.sampler = sampler
        self.last_step = last_step
        self._next = start_step + 1
        self._queue: deque[tuple[int, dict[str, Any], Future[Batch] | Callable[[], Batch]]] = (
            deque()
        )

    def _request(self) -> bool:
        """Queue the next step's batch (drawing its prompts now); False when none is left."""
        step = self._next
        if step > self.last_step or self.sampler.exhausted:
            return False
        state = self.sampler.state_dict()
        examples = self.sampler.next_batch(self.cfg.rollout.prompts_per_step)

        def job() -> Batch:
            return self.build(self.cfg, self.services, step, examples, state, self.context)

        ahead = self.cfg.sync.max_staleness > 0
        self._queue.append((step, state, _in_thread(job) if ahead else job))
        self._next += 1
        return True

    def get(self, step: int) -> Batch | None:
        """The batch of ``step`` (None when the data ran out)."""
        while len(self._queue) < self.cfg.sync.max_staleness + 1 and self._request():
            pass
        if not self._queue:
            return None
        queued_step, _, job = self._queue.popleft()
        assert queued_step == step, (queued_step, step)
        return job.result() if isinstance(job, Future) else job()

    def next_sampler_state(self) -> dict[str, Any]:
        """Where the data order continues after the last handed-out batch."""
        return self._queue[0][1] if self._queue else self.sampler.state_dict()

    def close(self) -> None:
        """Forget queued batches (their threads are daemons)."""
        for _, _, job in self._queue:
            if isinstance(job, Future):
                job.cancel()
        self._queue.clear()
