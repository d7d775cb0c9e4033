"""Replica pools: one logical service (the teacher, the rollout service) over several replicas.

A :class:`ReplicaPool` holds one :class:`~trainer.clients.ServiceClient` per replica
(``services.teacher_urls`` / ``services.rollout_urls``) and runs each request on one of them:

* **choice** -- the live replica with the fewest requests in flight; ties go round robin;
* **ejection** -- a replica whose request fails with a transient error (connection error,
  timeout, 429/5xx after its client's own short retry, 503 while not ready) is set aside and
  the request is sent again to another replica. Fatal errors (other 4xx, a malformed answer)
  are raised at once: another replica would refuse the same request the same way;
* **readmission** -- a set-aside replica is probed on ``GET /ready`` before a request, at
  most every ``probe_interval_s``; when it answers 200 the pool's ``admission_checks`` run
  (the trainer's: the same model and tokenizer as at start; for the rollout pool, the current
  weights pushed to it, see :mod:`trainer.weight_sync`) and it gets requests again;
* **giving up** -- a request fails when every replica has been failing for longer than the
  retry budget (``services.retry_timeout_s``), with an error naming the pool and each
  replica's last error.

A pool of one replica passes requests straight through (its client retries for the whole
budget itself, as without a pool). Weight updates never go through the balancing: they are
sent to each replica (:class:`~trainer.weight_sync.WeightSync`). Per-replica Prometheus
metrics: :class:`~trainer.observability.ReplicaMetrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from trainer.clients import (
    ServiceClient,
    ServiceUnavailable,
    TeacherClient,
    TokenScores,
    map_concurrently,
)
from trainer.observability import replica_metrics

__all__ = ["PoolUnavailable", "ReplicaPool", "TeacherPool"]

log = logging.getLogger("opd.trainer.pools")

C = TypeVar("C", bound=ServiceClient)
T = TypeVar("T")


class PoolUnavailable(ServiceUnavailable):
    """Every replica of a pool is down (for longer than the retry budget)."""

    def __init__(self, pool: str, reason: str, errors: dict[str, str]) -> None:
        detail = "; ".join(f"{url}: {error}" for url, error in errors.items())
        message = f"every replica of the {pool} pool is down ({reason}): {detail}"
        RuntimeError.__init__(self, message)
        self.service = pool
        self.status = None
        self.detail = message
        self.errors = dict(errors)


@dataclass
class _Replica(Generic[C]):
    client: C
    live: bool = True
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    error: str | None = None  # why it was set aside
    probe: str | None = None  # what its last /ready probe said
    next_probe: float = 0.0
    probing: bool = False

    @property
    def url(self) -> str:
        return self.client.base_url

    def last_error(self) -> str:
        if self.probe and self.error:
            return f"{self.error} (then {self.probe})"
        return self.error or self.probe or "no error"


class ReplicaPool(Generic[C]):
    """Requests over the replicas of one service; see the module docstring."""

    def __init__(
        self,
        name: str,
        clients: Sequence[C],
        *,
        budget_s: float = 600.0,
        probe_interval_s: float = 2.0,
        probe_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``name``: ``teacher`` or ``rollout`` (errors, logs, the metrics' ``pool`` label).
        ``clock`` and ``sleep`` exist for tests."""
        if not clients:
            raise ValueError(f"the {name} pool needs at least one replica")
        self.name = name
        self.budget_s = budget_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        #: run (in order) before a set-aside replica gets requests again; raising keeps it out
        self.admission_checks: list[Callable[[C], None]] = []
        #: held while the checks run and the replica is marked live (WeightSync's lock, so a
        #: replica is never taken back between a weight push's choice of targets and its end)
        self.admission_gate: AbstractContextManager[Any] = threading.RLock()
        self._replicas = [_Replica(c) for c in clients]
        self._lock = threading.Lock()
        self._cursor = 0
        self._clock = clock
        self._sleep = sleep
        self._metrics = replica_metrics()
        for r in self._replicas:  # every series exists from the start (at 0)
            for metric in self._metrics.collectors():
                metric.labels(name, r.url)
            self._metrics.up.labels(name, r.url).set(1)

    # ------------------------------------------------------------------ state

    @property
    def clients(self) -> tuple[C, ...]:
        """Every replica's client, in configuration order."""
        return tuple(r.client for r in self._replicas)

    def live(self) -> list[C]:
        """The replicas that get requests now."""
        with self._lock:
            return [r.client for r in self._replicas if r.live]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per replica URL: requests, errors, in_flight, live, last_error."""
        with self._lock:
            return {
                r.url: {
                    "requests": r.requests,
                    "errors": r.errors,
                    "in_flight": r.in_flight,
                    "live": r.live,
                    "last_error": None if r.live else r.last_error(),
                }
                for r in self._replicas
            }

    def eject(self, client: C, error: BaseException | str) -> None:
        """Set ``client``'s replica aside: it failed a request outside :meth:`call` (a weight
        push), which counts among its errors like one inside."""
        with self._lock:
            r = next(r for r in self._replicas if r.client is client)
            r.errors += 1
            self._eject(r, str(error))
        self._metrics.errors.labels(self.name, r.url).inc()

    def close(self) -> None:
        """Close every replica's client."""
        for r in self._replicas:
            r.client.close()

    # ------------------------------------------------------------------ requests

    def call(self, fn: Callable[[C], T]) -> T:
        """``fn(client)`` on the least-loaded live replica; on a transient failure
        (:class:`ServiceUnavailable`) the replica is set aside and ``fn`` runs on another.

        Raises:
            PoolUnavailable: every replica kept failing for longer than ``budget_s``.
            ServiceError: a fatal error (not retried on other replicas).
        """
        if len(self._replicas) == 1:
            with self._lock:
                self._take(self._replicas[0])
            return self._run(self._counted(self._replicas[0]), fn)
        failing_since: float | None = None
        while True:
            replica = self._acquire()
            if replica is None:
                failing_since = self._wait(failing_since)
                continue
            try:
                return self._run(replica, fn)
            except ServiceUnavailable:
                now = self._clock()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since >= self.budget_s:
                    raise self._unavailable(now - failing_since) from None

    def wait_live(self) -> None:
        """Return once some replica is live (probing the others); raises
        :class:`PoolUnavailable` when none is for longer than ``budget_s``."""
        failing_since: float | None = None
        while True:
            self._probe_due()
            if self.live():
                return
            failing_since = self._wait(failing_since)

    def _run(self, replica: _Replica[C], fn: Callable[[C], T]) -> T:
        started = self._clock()
        error: BaseException | None = None
        try:
            return fn(replica.client)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._release(replica, self._clock() - started, error)

    @staticmethod
    def _take(r: _Replica[C]) -> None:
        """Count a request in flight at ``r`` (caller holds ``self._lock``)."""
        r.in_flight += 1
        r.requests += 1

    def _counted(self, r: _Replica[C]) -> _Replica[C]:
        self._metrics.requests.labels(self.name, r.url).inc()
        self._metrics.in_flight.labels(self.name, r.url).inc()
        return r

    def _acquire(self) -> _Replica[C] | None:
        """The least-loaded live replica (ties: round robin), counted in flight; None if none."""
        self._probe_due()
        with self._lock:
            live = [r for r in self._replicas if r.live]
            if not live:
                return None
            least = min(r.in_flight for r in live)
            n = len(self._replicas)
            for k in range(n):
                i = (self._cursor + k) % n
                if self._replicas[i].live and self._replicas[i].in_flight == least:
                    self._cursor = (i + 1) % n
                    chosen = self._replicas[i]
                    break
            self._take(chosen)  # in the same critical section as the choice
        return self._counted(chosen)

    def _release(self, r: _Replica[C], seconds: float, error: BaseException | None) -> None:
        with self._lock:
            r.in_flight -= 1
            if error is not None:
                r.errors += 1
                if isinstance(error, ServiceUnavailable) and len(self._replicas) > 1:
                    self._eject(r, str(error))
        labels = (self.name, r.url)
        self._metrics.in_flight.labels(*labels).dec()
        self._metrics.seconds.labels(*labels).observe(seconds)
        if error is not None:
            self._metrics.errors.labels(*labels).inc()

    def _eject(self, r: _Replica[C], error: str) -> None:
        """Set ``r`` aside (caller holds ``self._lock``)."""
        r.error, r.probe = error, None
        r.next_probe = self._clock() + self.probe_interval_s
        if r.live:
            r.live = False
            self._metrics.up.labels(self.name, r.url).set(0)
            log.warning(
                "%s pool: setting replica %s aside (%s); probing its /ready every %.0fs",
                self.name,
                r.url,
                error,
                self.probe_interval_s,
            )

    # ------------------------------------------------------------------ readmission

    def _probe_due(self) -> None:
        """Probe every set-aside replica whose turn it is; take back those that pass."""
        now = self._clock()
        with self._lock:
            due = [
                r for r in self._replicas if not r.live and not r.probing and r.next_probe <= now
            ]
            for r in due:
                r.probing = True
        for r in due:
            try:
                self._probe(r)
            finally:
                with self._lock:
                    r.probing = False

    def _probe(self, r: _Replica[C]) -> None:
        problem = r.client.probe_ready(self.probe_timeout_s)
        if problem is None:
            try:
                with self.admission_gate:
                    for check in self.admission_checks:
                        check(r.client)
                    with self._lock:
                        r.live, r.error, r.probe = True, None, None
            except Exception as exc:  # the replica stays out; the error says why
                problem = f"ready, but not taken back: {type(exc).__name__}: {exc}"
            else:
                self._metrics.up.labels(self.name, r.url).set(1)
                log.warning("%s pool: replica %s is back", self.name, r.url)
                return
        with self._lock:
            r.probe = problem
            r.next_probe = self._clock() + self.probe_interval_s

    def _wait(self, failing_since: float | None) -> float:
        """No replica is live: sleep until the next probe is due, or give up past the budget."""
        now = self._clock()
        failing_since = now if failing_since is None else failing_since
        elapsed = now - failing_since
        if elapsed >= self.budget_s:
            raise self._unavailable(elapsed)
        with self._lock:
            due = min((r.next_probe for r in self._replicas if not r.live), default=now)
        self._sleep(min(max(due - now, 0.05), self.budget_s - elapsed))
        return failing_since

    def _unavailable(self, elapsed_s: float) -> PoolUnavailable:
        with self._lock:
            errors = {r.url: r.last_error() for r in self._replicas}
        reason = (
            f"failing for {elapsed_s:.1f}s, past the retry budget of {self.budget_s:.0f}s "
            "(services.retry_timeout_s)"
        )
        return PoolUnavailable(self.name, reason, errors)


class TeacherPool(ReplicaPool[TeacherClient]):
    """The teacher's replicas, with :meth:`TeacherClient.score`'s interface."""

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_k: int = 0,
        sequences_per_request: int = 64,
        max_concurrency: int = 8,
    ) -> list[TokenScores]:
        """:meth:`TeacherClient.score` over the pool: each ``/v1/score`` request of the call
        (``sequences_per_request`` sequences, up to ``max_concurrency`` at once) goes to the
        least-loaded live replica, and is sent again elsewhere when that replica fails."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        todo = [i for i, r in enumerate(responses) if len(r) > 0]
        if not todo:  # nothing to send: the client answers empty scores locally
            return self.clients[0].score(prompts, responses, temperature=temperature, top_k=top_k)
        chunks = [
            todo[k : k + sequences_per_request] for k in range(0, len(todo), sequences_per_request)
        ]
        # Empty responses ride along with the first chunk (the client never sends them).
        chunks[0] = chunks[0] + [i for i, r in enumerate(responses) if len(r) == 0]

        def one(chunk: list[int]) -> list[TokenScores]:
            def send(client: TeacherClient) -> list[TokenScores]:
                return client.score(
                    [prompts[i] for i in chunk],
                    [responses[i] for i in chunk],
                    temperature=temperature,
                    top_k=top_k,
                    sequences_per_request=len(chunk),
                    max_concurrency=1,
                )

            return self.call(send)

        out: list[TokenScores | None] = [None] * len(responses)
        for chunk, result in zip(
            chunks, map_concurrently(one, chunks, max_concurrency), strict=True
        ):
            for i, scores in zip(chunk, result, strict=True):
                out[i] = scores
        return out  # type: ignore[return-value]
