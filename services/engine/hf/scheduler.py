"""The hf backend's scheduler: one background task that owns every model call.

`score` and `generate` only validate, enqueue and await a future. The scheduler coalesces
queued work into forward batches and runs each forward in a worker thread
(`asyncio.to_thread`), one at a time, so the event loop stays responsive. When it wakes up
idle it waits `batch_wait_ms` to let concurrent callers join a batch.

- score: queued sequences are packed into batches (`scoring.pack_batches`), one forward each;
  with `prefix_sharing` (the default), sequences sharing a prefix are chunked together
  instead (`prefix.pack_shared`) and each chunk computes its shared prefixes once.
- generate: rows are admitted FIFO into *groups* (static batches, each with its own KV cache)
  while at most `max_num_seqs` rows decode in all and each group's prefill (distinct prompts x
  longest prompt, left-padded) stays within `max_batch_tokens` padded tokens (a lone row
  always goes). Rows of unseeded requests queued at the same time share a group
  (cross-request coalescing); a request with a `seed` always gets groups of its own, so its
  batches (and hence its numerics) depend only on the request itself: the same request
  against the same weights, engine config and device returns the same tokens, logprobs and
  text whatever else runs concurrently (bit-for-bit on CPU; on CUDA up to kernel
  determinism). Unseeded groups draw from a generator seeded from the engine's `config.seed`
  stream.
- Every round runs the queued score batches and one decode step of each active group, so long
  generations never block scoring and new requests are admitted as rows free up. KV memory is
  bounded by `max_num_seqs * (prompt + max_tokens)` tokens.
- A weight update waits until no generation is in flight (requests already started finish;
  new ones wait), so no trajectory mixes two weight versions.

Failure isolation: an exception in a batch that holds work of several requests re-runs each
request on its own (score: at once; generate: its rows are re-queued as an isolated group), so
only the request whose work fails gets the exception. A cancelled caller's rows are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..base import EngineConfig, ScoreInput, ScoreResult
from .generation import GenRequest, Group, GroupStepper, Row
from .prefix import pack_shared
from .scoring import pack_batches

logger = logging.getLogger("services.engine.hf")


@dataclass(eq=False)
class ScoreJob:
    """One `score` call: its future resolves when every input is scored."""

    inputs: list[ScoreInput]
    future: asyncio.Future
    results: list[ScoreResult | None]
    remaining: int


@dataclass(eq=False)
class ScoreItem:
    job: ScoreJob
    index: int
    inp: ScoreInput


@dataclass(eq=False)
class Update:
    """A blocking weight swap, run when no generation is in flight."""

    run: Callable[[], None]
    future: asyncio.Future


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Scheduler:
    """Queues, groups and the loop that runs them (see the module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        score: Callable[[list[ScoreInput], bool], list[ScoreResult]],
        stepper: GroupStepper,
        device: torch.device,
        prefix_sharing: bool = False,
    ) -> None:
        self.config = config
        # score(inputs, shared): one batch; `shared` says it was packed by `pack_shared`.
        self._score = score
        self.prefix_sharing = prefix_sharing
        self.stepper = stepper
        self.device = device
        self._rng = random.Random(config.seed)
        # Only touched on the event loop.
        self.score_queue: deque[ScoreItem] = deque()
        self.gen_queue: deque[GenRequest] = deque()
        self.groups: list[Group] = []
        self.updates: deque[Update] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        """Whether the loop is running and accepting work."""
        return self._task is not None and not self._closing

    def start(self) -> None:
        """Start the loop on the running event loop."""
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hf-engine-scheduler")

    async def stop(self) -> None:
        """Stop the loop and fail whatever is still queued or running."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        exc = RuntimeError("the engine is shutting down")
        for item in self.score_queue:
            _fail(item.job.future, exc)
        for req in self.gen_queue:
            _fail(req.future, exc)
        for group in self.groups:
            for req in group.requests:
                _fail(req.future, exc)
        for update in self.updates:
            _fail(update.future, exc)
        self.score_queue.clear()
        self.gen_queue.clear()
        self.groups.clear()
        self.updates.clear()

    # ------------------------------------------------------------------ submitting

    async def score(self, inputs: list[ScoreInput]) -> list[ScoreResult]:
        """Queue `inputs` and wait for their results."""
        future = asyncio.get_running_loop().create_future()
        job = ScoreJob(inputs=inputs, future=future, results=[None] * len(inputs),
                       remaining=len(inputs))
        self.score_queue.extend(ScoreItem(job, i, inp) for i, inp in enumerate(inputs))
        self._wake()
        return await future

    async def generate(self, req: GenRequest) -> Any:
        """Queue a generation request and wait for its samples."""
        self.gen_queue.append(req)
        self._wake()
        return await req.future

    async def update(self, run: Callable[[], None]) -> None:
        """Run the blocking `run` once no generation is in flight; new requests wait for it."""
        future = asyncio.get_running_loop().create_future()
        self.updates.append(Update(run=run, future=future))
        self._wake()
        await future

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _has_work(self) -> bool:
        return bool(self.score_queue or self.gen_queue or self.groups or self.updates)

    async def _run(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            if not self._has_work():
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.config.batch_wait_ms > 0:
                    # Idle -> busy: give concurrent callers a moment to join the first batch.
                    await asyncio.sleep(self.config.batch_wait_ms / 1000.0)
                continue
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a scheduler bug must not stop the engine
                logger.exception("hf engine scheduler error")
                await asyncio.sleep(0.01)

    async def _tick(self) -> None:
        """One round: queued scores, a pending weight swap, admissions, one decode step of
        every active generation group."""
        if self.score_queue:
            items = [it for it in self.score_queue if not it.job.future.done()]
            self.score_queue.clear()
            shared = self.prefix_sharing
            if shared:
                batches = pack_shared(items, lambda it: it.inp, self.config.max_batch_tokens)
            else:
                batches = pack_batches(
                    items, lambda it: len(it.inp.token_ids), self.config.max_batch_tokens
                )
            for batch in batches:
                await self._run_score_batch(batch, shared)
        self._drop_dead_requests()
        if self.updates and not self.groups and not any(r.started for r in self.gen_queue):
            update = self.updates.popleft()
            try:
                await asyncio.to_thread(update.run)
            except Exception as exc:
                _fail(update.future, exc)
            else:
                if not update.future.done():
                    update.future.set_result(None)
            return
        self._admit()
        for group in list(self.groups):
            await self._step_group(group)

    # ------------------------------------------------------------------ score batches

    async def _run_score_batch(self, batch: list[ScoreItem], shared: bool) -> None:
        batch = [it for it in batch if not it.job.future.done()]
        if not batch:
            return
        try:
            results = await asyncio.to_thread(self._score, [it.inp for it in batch], shared)
        except Exception as exc:
            jobs = list(dict.fromkeys(it.job for it in batch))
            if len(jobs) == 1:
                _fail(jobs[0].future, exc)
                return
            # Several requests shared the batch: re-run each alone so only the culprit fails.
            for job in jobs:
                items = [it for it in batch if it.job is job]
                try:
                    alone = await asyncio.to_thread(self._score, [it.inp for it in items], shared)
                except Exception as job_exc:
                    _fail(job.future, job_exc)
                else:
                    self._deliver_scores(items, alone)
            return
        self._deliver_scores(batch, results)

    @staticmethod
    def _deliver_scores(items: list[ScoreItem], results: list[ScoreResult]) -> None:
        for item, result in zip(items, results, strict=True):
            job = item.job
            if job.future.done():
                continue
            job.results[item.index] = result
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(list(job.results))

    # ------------------------------------------------------------------ generation groups

    def _drop_dead_requests(self) -> None:
        """Forget queued requests whose caller went away or that already failed."""
        if any(req.future.done() for req in self.gen_queue):
            self.gen_queue = deque(req for req in self.gen_queue if not req.future.done())

    def _admit(self) -> None:
        """Move queued rows into new groups: FIFO, at most `max_num_seqs` rows decoding in all,
        and each group's prefill (distinct prompts x longest prompt) within `max_batch_tokens`
        padded tokens (a lone row always fits). Rows of consecutive unseeded requests share a
        group; an isolated (seeded) request gets groups of its own."""
        rows_left = self.config.max_num_seqs - sum(len(g.rows) for g in self.groups)
        updating = bool(self.updates)
        while self.gen_queue and rows_left > 0:
            taken: list[Row] = []
            prompts: set[tuple[int, int]] = set()
            width = 0
            requests: list[GenRequest] = []
            for req in list(self.gen_queue):
                if updating and not req.started:
                    break  # hold new requests until the pending weight swap is done
                if req.isolated and taken:
                    break  # an isolated request starts its own group
                took = False
                while req.pending and rows_left > 0:
                    row = req.pending[0]
                    key = (id(req), row.prompt_index)
                    new_width = max(width, len(row.prompt_ids))
                    n_prompts = len(prompts) + (key not in prompts)
                    if taken and n_prompts * new_width > self.config.max_batch_tokens:
                        break
                    taken.append(req.pending.popleft())
                    prompts.add(key)
                    width = new_width
                    rows_left -= 1
                    took = True
                if took:
                    requests.append(req)
                    req.started = True
                if not req.pending:
                    self.gen_queue.remove(req)
                if req.pending or req.isolated:
                    break  # this group is full, or an isolated request's group is complete
            if not taken:
                return
            shared_gen = None
            if taken[0].req.spec.seed is None:
                shared_gen = torch.Generator(device=self.device).manual_seed(
                    self._rng.getrandbits(63)
                )
            self.groups.append(
                Group(rows=taken, generator=shared_gen, requests=set(requests),
                      members=tuple(taken))
            )

    async def _step_group(self, group: Group) -> None:
        for row in group.rows:
            if row.req.future.done():
                row.dead = True
        try:
            finished = await asyncio.to_thread(self.stepper.step, group)
        except Exception as exc:
            self.groups.remove(group)
            self._group_failed(group, exc)
            return
        for row in finished:
            self._finish_row(row)
        if not group.rows:
            self.groups.remove(group)

    def _group_failed(self, group: Group, exc: BaseException) -> None:
        live = [r for r in group.requests if not r.future.done()]
        if len(group.requests) == 1:
            for req in live:
                _fail(req.future, exc)
            return
        # A shared batch failed: retry each request alone so only the culprit fails.
        logger.warning("generation batch of %d requests failed (%s); retrying each alone",
                       len(live), exc)
        for req in live:
            # every undelivered row, including any that finished inside the failed step
            rows = [r for r in group.members if r.req is req and not r.delivered]
            for row in reversed(rows):
                row.reset()
                req.pending.appendleft(row)
            req.isolated = True
            if rows and req not in self.gen_queue:
                self.gen_queue.appendleft(req)

    @staticmethod
    def _finish_row(row: Row) -> None:
        req = row.req
        if req.future.done():
            return
        req.samples[row.prompt_index][row.sample_index] = row.sample()
        row.delivered = True
        req.remaining -= 1
        if req.remaining == 0:
            req.future.set_result([list(s) for s in req.samples])
