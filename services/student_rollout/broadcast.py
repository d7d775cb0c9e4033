"""Weight updates over a torch.distributed broadcast: the third transport (docs/rollout.md).

The trainer (rank 0) and every replica join one process group of their own
(`broadcast_group`); the trainer sends the state dict in buckets, each replica receives into
staging tensors and swaps them in like a checkpoint from disk. Who joins and receives depends
on the engine (`broadcast_transport`): this process for hf, the engine itself for vllm (in
vLLM's worker, through vLLM's weight-transfer API); the routes and their checks are the same.
Behind the API key, like every weight route:

- `POST /v1/weights/broadcast/init` (`BroadcastInitRequest`) -> 202: the replica starts
  joining in the background and answers at once, so the trainer can call every replica
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
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Query, Request

from services.common.app import ServiceState, get_state
from services.common.errors import APIError
from services.common.openapi import error_responses
from services.engine.base import Engine, WeightsError
from services.protocol import BroadcastInitRequest, BroadcastRequest, BroadcastStatus
from services.student_rollout.broadcast_group import (
    BroadcastCancelled,
    describe_error,
    local_host_towards,
)
from services.student_rollout.broadcast_manifest import check_manifest
from services.student_rollout.broadcast_transport import (
    SOURCE,
    Job,
    Swap,
    Transport,
    make_transport,
    transport_unsupported,
)
from services.student_rollout.versioning import PolicyVersions, VersionConflict, unwrap_engine
from services.student_rollout.weights import WeightsManager

logger = logging.getLogger("opd.student_rollout")

__all__ = ["SOURCE", "BroadcastManager", "broadcast_router", "check_manifest"]


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
        # This replica's end of the group (None: no group).
        self._transport: Transport | None = None
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
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._pending = None
        self.state, self.error = state, error
        if state == "idle":
            self.init = None

    def close(self) -> None:
        """App shutdown: drop the group, cancel a broadcast in flight."""
        self.drop()

    # ----------------------------------------------------------------- checks

    def _require_transport(self, engine: Engine) -> None:
        reason = transport_unsupported(engine)
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
        self._require_transport(engine)
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
        self._transport = transport = make_transport(engine)
        self._pending = transport.join(
            req, host, device, lambda error: self._joined(generation, error)
        )
        where = f"rank {req.rank} of {req.world_size}, {req.backend}, via {req.master_addr}"
        logger.info("joining weight broadcast group %r (%s)", req.group_name, where)
        return self.status()

    def _joined(self, generation: int, exc: BaseException | None) -> None:
        if generation != self.generation:
            return  # superseded: its transport was closed, so the group (if any) is dropped
        if exc is not None:
            assert self.init is not None
            self.drop(
                state="failed",
                error=f"joining group {self.init.group_name!r} failed: {describe_error(exc)}",
            )
            logger.warning("weight broadcast: %s", self.error)
            return
        self.state = "ready"
        logger.info("joined weight broadcast group %r", self.init.group_name if self.init else "")

    # ----------------------------------------------------------------- broadcast

    async def start_broadcast(
        self, state: ServiceState, engine: Engine, req: BroadcastRequest, started: float
    ) -> BroadcastStatus:
        """Validate everything, then receive and swap in the background; answers at once."""
        self._require_transport(engine)
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
        init, transport = self.init, self._transport
        if (
            self.state != "ready"
            or init is None
            or transport is None
            or init.group_name != req.group_name
        ):
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
        job = Job(req, plan, self.generation, init.backend, self.device, job_cancel, started)
        task = asyncio.create_task(self._run(state, transport, job))
        self._tasks.add(task)  # the loop keeps weak references only
        task.add_done_callback(self._tasks.discard)
        self._pending = task
        return self.status()

    def _progress(self, job: Job) -> Callable[[int], None]:
        def progress(received: int) -> None:
            if job.generation == self.generation:
                self.received = received

        return progress

    async def _run(self, state: ServiceState, transport: Transport, job: Job) -> None:
        """Receive, then swap in; on any failure drop the group (see module)."""
        req = job.req
        swap: Swap | None = None
        try:
            swap = await transport.receive(job, self._progress(job))
            if job.cancel.is_set() or job.generation != self.generation:
                raise BroadcastCancelled("cancelled before the swap")
            await self.weights.swap_in(swap, req.version, SOURCE, job.started, None)
        except BaseException as exc:  # noqa: BLE001 - every failure leaves the old weights
            refused = isinstance(exc, WeightsError | VersionConflict)
            state.metrics.weight_update(SOURCE, "rejected" if refused else "error")
            if job.generation == self.generation:
                serving = self.versions.version
                error = f"broadcast of version {req.version} failed: {describe_error(exc)}"
                self.drop(state="failed", error=f"{error}; still serving policy_version {serving}")
                self.result = "failed"
                logger.warning("weight broadcast: %s", self.error)
            if swap is not None:  # received but not swapped in (or the swap failed)
                await self._discard(transport)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        state.metrics.weight_update(SOURCE, "ok", time.perf_counter() - job.started)
        if job.generation == self.generation:
            self.state, self.result = "ready", "ok"

    @staticmethod
    async def _discard(transport: Transport) -> None:
        try:
            await asyncio.shield(transport.discard())
        except Exception as exc:  # noqa: BLE001 - the next receive replaces the staging anyway
            logger.warning("weight broadcast: dropping the staged weights failed: %s",
                           describe_error(exc))


# --------------------------------------------------------------------------- routes

_DESCRIPTIONS = {
    409: "conflict: the version is not newer than the one serving, the named group is not "
    "joined here, or another broadcast is being received",
    501: "this engine cannot take weights over a broadcast as started (a vllm engine with "
    "tensor_parallel_size above 1 or without vLLM's weight transfer): use load or upload",
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
