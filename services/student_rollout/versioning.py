"""Policy version state and the readers-writer lock that keeps trajectories single-version.

Every request that runs the model (rollouts, OpenAI completions) holds a *read lease* for its
whole engine call and reports the version it was admitted under. A weight update takes the
*write lock*: it waits until the in-flight readers finish, and readers that arrive while it
waits queue behind it (writer preference: with a steady stream of rollouts an update would
otherwise never get in). Hence:

- no trajectory mixes two versions (the weights cannot change while any reader runs);
- a request admitted before an update finishes on the old weights and says so;
- a request admitted after an update was *requested* runs on the new weights (or, if the
  update fails, on the old ones under the old version).

Versions only grow. An update whose version is not strictly greater than the serving one is
refused with 409, *including an equal version*: two different checkpoints under one version
number would make `policy_version` ambiguous, and a trainer that retries an update that in
fact succeeded can read `GET /v1/weights` to see it landed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from services.engine.base import (
    BroadcastReceiver,
    Engine,
    EngineInfo,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
)


class VersionConflict(Exception):
    """An update's version is not newer than the one serving (HTTP 409)."""

    def __init__(self, requested: int, current: int) -> None:
        super().__init__(
            f"version {requested} is not newer than the serving policy_version {current}; "
            "versions must strictly increase"
        )
        self.requested = requested
        self.current = current


class ReadWriteLock:
    """An asyncio readers-writer lock with writer preference.

    Many readers at once, or one writer. A waiting writer blocks new readers, so updates are
    not starved by a continuous stream of requests. Not thread-safe: use from one event loop.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @property
    def readers(self) -> int:
        """Readers holding the lock now."""
        return self._readers

    @property
    def writer_waiting(self) -> bool:
        """Whether a writer holds or waits for the lock."""
        return self._writer or self._writers_waiting > 0

    async def acquire_read(self) -> None:
        """Wait until no writer holds or waits for the lock, then take a read lease."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1

    async def release_read(self) -> None:
        """Give back a read lease; wakes a waiting writer when it was the last reader."""
        async with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    async def acquire_write(self) -> None:
        """Wait for the readers in flight to finish, then hold the lock alone."""
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            except BaseException:
                # Cancelled while waiting: a writer that gave up must not keep readers blocked.
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = True

    async def release_write(self) -> None:
        """Release the writer's hold; queued readers (or the next writer) proceed."""
        async with self._cond:
            self._writer = False
            self._cond.notify_all()

    def read(self) -> AbstractAsyncContextManager[None]:
        """`async with lock.read():` a shared lease."""
        return _held(self.acquire_read, self.release_read)

    def write(self) -> AbstractAsyncContextManager[None]:
        """`async with lock.write():` exclusive access."""
        return _held(self.acquire_write, self.release_write)


@asynccontextmanager
async def _held(acquire: Callable[[], Awaitable[None]],
                release: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    await acquire()
    try:
        yield
    finally:
        # Shield: a cancelled request must still return its lease, or the others hang forever.
        await asyncio.shield(release())


@dataclass
class PolicySnapshot:
    """What is serving: the version, where it came from, since when."""

    version: int
    source: str
    loaded_at: float
    update_seconds: float | None = None


class PolicyVersions:
    """The serving policy version and the lock that ties requests to it."""

    def __init__(self, initial_version: int = 0, source: str = "initial") -> None:
        self._lock = ReadWriteLock()
        # Updates run one at a time; only their swap step excludes readers.
        self._update_mutex = asyncio.Lock()
        self._current = PolicySnapshot(initial_version, source, time.time())

    @property
    def current(self) -> PolicySnapshot:
        """The snapshot serving now (a copy is not needed: snapshots are replaced, not mutated)."""
        return self._current

    @property
    def version(self) -> int:
        """The serving version."""
        return self._current.version

    @property
    def in_flight(self) -> int:
        """Requests holding a read lease now."""
        return self._lock.readers

    def check_newer(self, version: int) -> None:
        """Raise `VersionConflict` unless `version` is strictly newer than the serving one."""
        if version <= self._current.version:
            raise VersionConflict(version, self._current.version)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        """Hold a read lease; yields the version every result produced inside belongs to."""
        async with self._lock.read():
            yield self._current.version

    @asynccontextmanager
    async def updating(
        self, version: int, source: str, started: float | None = None
    ) -> AsyncIterator[None]:
        """Exclusive hold for swapping the weights to `version`.

        Checks the version before waiting (fast 409) and again once exclusive (another update
        may have landed meanwhile). The new version is committed only when the body exits
        without an exception, so a failed swap leaves the old version serving. `started`
        (a `time.perf_counter()` value) is when the update began, for `update_seconds`;
        default: when the exclusive hold was taken.
        """
        self.check_newer(version)
        async with self._update_mutex:
            self.check_newer(version)
            async with self._lock.write():
                self.check_newer(version)
                if started is None:
                    started = time.perf_counter()
                yield
                now = time.time()
                self._current = PolicySnapshot(
                    version, source, now, update_seconds=time.perf_counter() - started
                )


class LeasedEngine(Engine):
    """An engine whose every model call holds a read lease of `versions`.

    The app puts this in front of the real engine for code it does not own (the shared
    OpenAI routes), so those never run while weights are being swapped. The rollout and
    weights routes use `inner` directly: rollouts take one lease themselves (nesting a second
    read lease could deadlock behind a waiting writer), and updates take the write lock.
    """

    def __init__(self, inner: Engine, versions: PolicyVersions) -> None:
        self.inner = inner
        self.versions = versions
        self.config = inner.config

    @property
    def tokenizer(self):  # untyped like Engine.tokenizer (transformers tokenizer)
        """The wrapped engine's tokenizer."""
        return self.inner.tokenizer

    async def start(self) -> None:
        """Start the wrapped engine."""
        await self.inner.start()

    async def shutdown(self) -> None:
        """Shut the wrapped engine down."""
        await self.inner.shutdown()

    def info(self) -> EngineInfo:
        """The wrapped engine's info."""
        return self.inner.info()

    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Score under a read lease."""
        async with self.versions.serving():
            return await self.inner.score(inputs)

    async def generate(
        self, prompts: Sequence[list[int]], spec: SamplingSpec
    ) -> list[list[GeneratedSample]]:
        """Generate under a read lease."""
        async with self.versions.serving():
            return await self.inner.generate(prompts, spec)

    async def load_weights(self, checkpoint_dir: str) -> None:
        """Refused: updates go through the weights routes, which hold the write lock."""
        raise RuntimeError("load weights through WeightsManager, not the leased engine")

    def tensor_weights_unsupported(self) -> str | None:
        """The wrapped engine's answer."""
        return self.inner.tensor_weights_unsupported()

    async def load_weights_from_tensors(self, tensors: Any, source: str) -> None:
        """Refused like `load_weights`: the broadcast manager swaps under the write lock."""
        raise RuntimeError("load weights through WeightsManager, not the leased engine")

    def broadcast_receiver(self) -> BroadcastReceiver | None:
        """The wrapped engine's (the broadcast manager commits under the write lock)."""
        return self.inner.broadcast_receiver()

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (stats, the vLLM client) stay reachable. `inner` itself is
        # excluded so a half-built object (copy, pickle) cannot recurse forever.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def unwrap_engine(engine: Engine) -> Engine:
    """The real engine behind a `LeasedEngine` (or the engine itself)."""
    return engine.inner if isinstance(engine, LeasedEngine) else engine
