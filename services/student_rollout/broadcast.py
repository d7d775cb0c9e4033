"""Weight updates over a torch.distributed broadcast: the third transport (docs/rollout.md).

The trainer (rank 0) and every replica join one process group of their own
(`broadcast_group`); the trainer sends the state dict in buckets, each replica receives into
staging tensors and swaps them in like a checkpoint from disk. Behind the API key, like every
weight route:

- `POST /v1/weights/broadcast/init` (`BroadcastInitRequest`) -> 202: the replica starts
  joining in a background thread and answers at once, so the trainer can call every replica
  and then join itself as rank 0 (joining completes when all ranks are in);
- `POST /v1/weights/broadcast` (`BroadcastRequest`: version, group, manifest of names,
  shapes and dtypes, bucket size) -> 202: everything is checked first (the version is newer,
  the group is joined, the manifest matches the initial checkpoint's tensors); then the
  buckets are received in the background and swapped in through `WeightsManager.swap_in`,
  the step the disk path ends in (write lock, version committed only on success);
- `GET /v1/weights/broadcast?wait_s=S` -> 200 `BroadcastStatus`; waits up to S seconds while
  a join or a broadcast is in flight, so the trainer learns how its broadcast ended;
- `DELETE /v1/weights/broadcast[?group_name=G]` -> 200: drops the group (only that group when
  named); a broadcast being received is cancelled and never swapped in.

Atomicity: nothing changes before the swap step, and the swap step is the disk path's. A
broadcast that fails or is cut off (the sender closes, a bucket times out after the group's
`timeout_s`, a DELETE) leaves the old weights serving under the old version; the group is
dropped on any failure, and the next `init` starts a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Query, Request

from services.common.app import ServiceState, get_state
from services.common.errors import APIError
from services.common.openapi import error_responses
from services.engine.base import Engine, WeightsError
from services.engine.checkpoint import CheckpointSpec, check_layout
from services.engine.dtypes import canonical_dtype
from services.protocol import (
    BroadcastBucket,
    BroadcastInitRequest,
    BroadcastRequest,
    BroadcastStatus,
)
from services.student_rollout.broadcast_group import (
    bucket_device,
    describe_error,
    join_group,
    local_host_towards,
    unpack,
)
from services.student_rollout.versioning import PolicyVersions, VersionConflict, unwrap_engine
from services.student_rollout.weights import WeightsManager

logger = logging.getLogger("opd.student_rollout")

T = TypeVar("T")
SOURCE = "broadcast"


class _Cancelled(Exception):
    """The broadcast was cancelled (DELETE, shutdown) before it was swapped in."""


def _in_thread(
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


def _bad_manifest(message: str, param: str, serving: int) -> APIError:
    return APIError(
        400,
        f"{message}; still serving policy_version {serving}",
        param=param,
        code="invalid_manifest",
    )


def check_manifest(req: BroadcastRequest, spec: CheckpointSpec, serving: int) -> None:
    """400 naming the entry unless the manifest holds exactly the model's tensors."""
    allowed = {**spec.optional, **spec}
    seen: dict[str, int] = {}
    for i, t in enumerate(req.tensors):
        at = f"tensors[{i}]"
        if t.name in seen:
            raise _bad_manifest(
                f"{at}.name: {t.name!r} appears twice (also tensors[{seen[t.name]}])",
                f"tensors.{i}.name",
                serving,
            )
        seen[t.name] = i
        if t.name not in allowed:
            raise _bad_manifest(
                f"{at}.name: {t.name!r} is not a tensor of this model's checkpoint",
                f"tensors.{i}.name",
                serving,
            )
        shape, dtype = tuple(allowed[t.name][0]), canonical_dtype(allowed[t.name][1])
        if tuple(t.shape) != shape:
            raise _bad_manifest(
                f"{at}.shape: tensor {t.name!r} has shape {tuple(t.shape)}, expected {shape}",
                f"tensors.{i}.shape",
                serving,
            )
        if canonical_dtype(t.dtype) != dtype:
            raise _bad_manifest(
                f"{at}.dtype: tensor {t.name!r} has dtype {t.dtype}, expected "
                f"{dtype} (safetensors' spelling)",
                f"tensors.{i}.dtype",
                serving,
            )
    try:  # what is left: required names the manifest lacks
        check_layout({t.name: (tuple(t.shape), t.dtype) for t in req.tensors}, spec)
    except WeightsError as exc:
        raise _bad_manifest(f"tensors: {exc}", "tensors", serving) from exc


@dataclass(frozen=True)
class _Job:
    """One broadcast being received."""

    req: BroadcastRequest
    plan: list[BroadcastBucket]
    generation: int
    backend: str
    device: torch.device
    cancel: threading.Event
    started: float


class BroadcastManager:
    """The broadcast group of one rollout app and the update it is receiving."""

    def __init__(self, weights: WeightsManager, versions: PolicyVersions) -> None:
        self.weights = weights
        self.versions = versions
        self.state: str = "idle"
        self.init: BroadcastInitRequest | None = None
        self.device = torch.device("cpu")
        self.error: str | None = None
        self.version: int | None = None
        self.result: str | None = None
        self.buckets: int | None = None
        self.received = 0
        # Bumped whenever the group is dropped or replaced: a join or a receive that finishes
        # under an older generation must not touch the state (nor swap anything in).
        self.generation = 0
        self._group: Any = None
        self._store: Any = None
        self._pending: asyncio.Future[Any] | None = None
        self._cancel = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- status

    def status(self) -> BroadcastStatus:
        """Where the group and the last broadcast stand."""
        init = self.init
        return BroadcastStatus(
            state=self.state,  # type: ignore[arg-type]
            group_name=init.group_name if init else None,
            rank=init.rank if init else None,
            world_size=init.world_size if init else None,
            backend=init.backend if init else None,
            version=self.version,
            result=self.result,  # type: ignore[arg-type]
            buckets=self.buckets,
            buckets_received=self.received,
            error=self.error,
            policy_version=self.versions.version,
        )

    async def wait(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the join or broadcast in flight (if any) to end."""
        pending = self._pending
        if pending is not None and not pending.done() and timeout_s > 0:
            await asyncio.wait({pending}, timeout=timeout_s)

    # ----------------------------------------------------------------- teardown

    def drop(self, state: str = "idle", error: str | None = None) -> None:
        """Drop the group (its connections close once a receive still using it ends)."""
        self.generation += 1
        self._cancel.set()
        self._group = self._store = None
        self._pending = None
        self.state, self.error = state, error
        if state == "idle":
            self.init = None

    def close(self) -> None:
        """App shutdown: drop the group, cancel a broadcast in flight."""
        self.drop()

    # ----------------------------------------------------------------- checks

    def _require_tensor_weights(self, engine: Engine) -> None:
        reason = engine.tensor_weights_unsupported()
        if reason is not None:
            raise APIError(
                501,
                f"{reason}; update this replica with POST /v1/weights/load or PUT /v1/weights "
                "(sync.method load / upload)",
                code="broadcast_unsupported",
            )

    def _in_flight(self) -> APIError:
        return APIError(
            409,
            f"a broadcast of version {self.version} is being received (bucket "
            f"{self.received} of {self.buckets}); wait for it (GET /v1/weights/broadcast) or "
            "cancel it (DELETE /v1/weights/broadcast)",
            code="broadcast_in_flight",
        )

    # ----------------------------------------------------------------- join

    async def start_join(
        self, state: ServiceState, engine: Engine, req: BroadcastInitRequest
    ) -> BroadcastStatus:
        """Validate, then join the group in the background; answers at once."""
        self._require_tensor_weights(engine)
        if req.rank >= req.world_size:
            raise APIError(
                400,
                f"rank: {req.rank} is not below world_size {req.world_size} "
                "(ranks are 0..world_size-1; the trainer is 0)",
                param="rank",
            )
        if self.state == "receiving":
            raise self._in_flight()
        if self.init == req and self.state in ("joining", "ready"):
            return self.status()  # a retried request: the same group, already under way
        device = torch.device(state.engine_info.device if state.engine_info else "cpu")
        if req.backend == "nccl" and (
            device.type != "cuda" or not torch.distributed.is_nccl_available()
        ):
            raise APIError(
                400,
                f"backend: 'nccl' needs the model on a CUDA device with NCCL; "
                f"this replica runs on {device} (use 'gloo')",
                param="backend",
            )
        try:
            host = await asyncio.to_thread(local_host_towards, req.master_addr, req.master_port)
        except (OSError, UnicodeError, ValueError) as exc:  # unresolvable, unroutable, bad name
            raise APIError(
                400, f"master_addr: no route to {req.master_addr!r}: {exc}", param="master_addr"
            ) from exc
        self.drop(state="joining")
        self.init, self.device = req, device
        self.version = self.result = self.buckets = None
        self.received = 0
        generation = self.generation

        self._pending = _in_thread(
            lambda: join_group(req, host=host, device=device),
            lambda error, joined: self._joined(generation, error, joined),
        )
        where = f"rank {req.rank} of {req.world_size}, {req.backend}, via {req.master_addr}"
        logger.info("joining weight broadcast group %r (%s)", req.group_name, where)
        return self.status()

    def _joined(
        self, generation: int, exc: BaseException | None, joined: tuple[Any, Any] | None
    ) -> None:
        if generation != self.generation:
            return  # superseded: the group (if any) is dropped with the future
        if exc is not None or joined is None:
            assert self.init is not None
            self.drop(
                state="failed",
                error=f"joining group {self.init.group_name!r} failed: {describe_error(exc)}",
            )
            logger.warning("weight broadcast: %s", self.error)
            return
        self._store, self._group = joined
        self.state = "ready"
        logger.info("joined weight broadcast group %r", self.init.group_name if self.init else "")

    # ----------------------------------------------------------------- broadcast

    async def start_broadcast(
        self, state: ServiceState, engine: Engine, req: BroadcastRequest, started: float
    ) -> BroadcastStatus:
        """Validate everything, then receive and swap in the background; answers at once."""
        self._require_tensor_weights(engine)
        spec = self.weights._require_spec()
        init = self.init
        if (
            self.state == "receiving"
            and init is not None
            and self.version == req.version
            and init.group_name == req.group_name
        ):
            return self.status()  # a retried request: this very broadcast is under way
        self.weights.check_version(req.version)
        check_manifest(req, spec, self.versions.version)
        if self.state == "receiving":
            raise self._in_flight()
        if self.state == "joining" and init is not None:
            await self.wait(init.timeout_s)
        init = self.init
        if self.state != "ready" or init is None or init.group_name != req.group_name:
            joined = f"group {init.group_name!r} is {self.state}" if init else "no group"
            why = f" ({self.error})" if self.error else ""
            raise APIError(
                409,
                f"group_name: {req.group_name!r} is not joined here ({joined}"
                f"{why}); POST /v1/weights/broadcast/init first",
                param="group_name",
                code="broadcast_group_not_joined",
            )
        self.weights.check_version(req.version)  # again: the wait may have let one land

        plan = req.bucket_plan()
        self.state, self.error = "receiving", None
        self.version, self.result, self.buckets, self.received = req.version, None, len(plan), 0
        self._cancel = job_cancel = threading.Event()
        job = _Job(req, plan, self.generation, init.backend, self.device, job_cancel, started)
        task = asyncio.create_task(self._run(state, engine, job, self._group))
        self._tasks.add(task)  # the loop keeps weak references only
        task.add_done_callback(self._tasks.discard)
        self._pending = task
        return self.status()

    def _receive(self, job: _Job, group: list[Any]) -> list[torch.Tensor]:
        """Receive every bucket into fresh staging tensors (CPU); blocking."""
        pg = group.pop()  # the only reference left once the manager dropped the group
        if job.device.type == "cuda":
            torch.cuda.set_device(job.device)
        staging = [torch.empty(t.shape, dtype=getattr(torch, t.dtype)) for t in job.req.tensors]
        where = bucket_device(job.backend, job.device)
        buffer = torch.empty(max(b.nbytes for b in job.plan), dtype=torch.uint8, device=where)
        total = len(job.plan)
        for i, bucket in enumerate(job.plan):
            if job.cancel.is_set():
                raise _Cancelled(f"cancelled after {i} of {total} buckets")
            flat = buffer[: bucket.nbytes]
            try:
                pg.broadcast(flat, root=0).wait()
            except Exception as exc:
                message = f"receiving bucket {i + 1} of {total} failed: {describe_error(exc)}"
                raise RuntimeError(message) from exc
            unpack(bucket, flat if flat.device.type == "cpu" else flat.cpu(), staging)
            if job.generation == self.generation:
                self.received = i + 1
        return staging

    async def _run(self, state: ServiceState, engine: Engine, job: _Job, group: Any) -> None:
        """Receive (in a thread), then swap in; on any failure drop the group (see module)."""
        req, holder = job.req, [group]
        del group
        try:
            staging = await _in_thread(lambda: self._receive(job, holder))
            if job.cancel.is_set() or job.generation != self.generation:
                raise _Cancelled("cancelled before the swap")
            tensors = {t.name: staging[i] for i, t in enumerate(req.tensors)}

            async def load() -> None:
                await engine.load_weights_from_tensors(tensors, SOURCE)

            await self.weights.swap_in(load, req.version, SOURCE, job.started, None)
        except BaseException as exc:  # noqa: BLE001 - every failure leaves the old weights
            refused = isinstance(exc, WeightsError | VersionConflict)
            state.metrics.weight_update(SOURCE, "rejected" if refused else "error")
            if job.generation == self.generation:
                serving = self.versions.version
                error = f"broadcast of version {req.version} failed: {describe_error(exc)}"
                self.drop(state="failed", error=f"{error}; still serving policy_version {serving}")
                self.result = "failed"
                logger.warning("weight broadcast: %s", self.error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        state.metrics.weight_update(SOURCE, "ok", time.perf_counter() - job.started)
        if job.generation == self.generation:
            self.state, self.result = "ready", "ok"


# --------------------------------------------------------------------------- routes

_DESCRIPTIONS = {
    409: "conflict: the version is not newer than the one serving, the named group is not "
    "joined here, or another broadcast is being received",
    501: "this backend cannot take weights over a broadcast (use load or upload)",
}


def _broadcaster(request: Request) -> BroadcastManager:
    return request.app.state.broadcast


def broadcast_router() -> APIRouter:
    """`/v1/weights/broadcast/init`, `/v1/weights/broadcast` (POST, GET, DELETE)."""
    router = APIRouter(tags=["weights"])

    @router.post(
        "/v1/weights/broadcast/init",
        status_code=202,
        response_model=BroadcastStatus,
        responses=error_responses(400, 409, 501, 503, descriptions=_DESCRIPTIONS),
    )
    async def broadcast_init(body: BroadcastInitRequest, request: Request) -> BroadcastStatus:
        """Join the trainer's broadcast group (in the background; answers at once)."""
        state = get_state(request)
        engine = unwrap_engine(state.require_engine())
        return await _broadcaster(request).start_join(state, engine, body)

    @router.post(
        "/v1/weights/broadcast",
        status_code=202,
        response_model=BroadcastStatus,
        responses=error_responses(400, 409, 501, 503, descriptions=_DESCRIPTIONS),
    )
    async def broadcast_weights(body: BroadcastRequest, request: Request) -> BroadcastStatus:
        """Receive `tensors` over the joined group as `version` (in the background)."""
        state = get_state(request)
        started = time.perf_counter()
        try:
            engine = unwrap_engine(state.require_engine())
            return await _broadcaster(request).start_broadcast(state, engine, body, started)
        except APIError as exc:
            if exc.status < 500:
                state.metrics.weight_update(SOURCE, "rejected")
            raise

    @router.get("/v1/weights/broadcast", response_model=BroadcastStatus)
    async def broadcast_status(
        request: Request,
        wait_s: float = Query(
            0.0,
            ge=0.0,
            le=600.0,
            description="wait up to this long while a join or a broadcast is in flight",
        ),
    ) -> BroadcastStatus:
        """The group's state and how the last broadcast ended."""
        broadcaster = _broadcaster(request)
        await broadcaster.wait(wait_s)
        return broadcaster.status()

    @router.delete("/v1/weights/broadcast", response_model=BroadcastStatus)
    async def broadcast_close(
        request: Request,
        group_name: str | None = Query(
            None, max_length=128, description="drop the group only if it is this one"
        ),
    ) -> BroadcastStatus:
        """Drop the group; a broadcast being received is cancelled (never swapped in)."""
        broadcaster = _broadcaster(request)
        init = broadcaster.init
        if group_name is None or (init is not None and init.group_name == group_name):
            broadcaster.drop()
        return broadcaster.status()

    return router
