"""``sync.method: broadcast``: the trainer's weights to every rollout replica over one group.

The trainer is rank 0 of a torch.distributed group of its own (a ``TCPStore`` it hosts and a
gloo or NCCL backend object built on it: ``services.student_rollout.broadcast_group``, never
the default group, so it runs beside torchrun/FSDP); each replica is one more rank. The
rendezvous goes through the replicas' routes, so no replica needs to know the others:

1. first :meth:`BroadcastSender.send`: ``POST /v1/weights/broadcast/init`` to every replica
   (each answers at once and joins in the background), then the trainer joins as rank 0,
   which completes when all ranks are in;
2. each send: ``POST /v1/weights/broadcast`` (version, manifest of names, shapes, dtypes,
   bucket size) to every replica -- each checks it all and starts receiving -- then the
   state dict goes out bucket by bucket, then ``GET /v1/weights/broadcast?wait_s=`` on each
   until it says how the swap ended.

Any failure tears the group down on both sides (the trainer's end is closed at once, so a
replica blocked on a bucket fails at once instead of at its timeout) and raises
:class:`BroadcastError`, so the caller can fall back to the disk path; each replica's swap is
atomic (one that had not swapped serves its old weights under its old version), and the
error lists the replicas that had (``swapped``: a disk push of the same version gets 409
there). The next send sets up a fresh group.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import httpx
import torch

from services.protocol import (
    BROADCAST_DTYPES,
    BroadcastInitRequest,
    BroadcastRequest,
    BroadcastStatus,
    BroadcastTensor,
)
from services.student_rollout.broadcast_group import (
    bucket_device,
    describe_error,
    local_host_towards,
    open_group,
    pack,
    prefixed_store,
    resolve_host,
)
from trainer.clients import RolloutClient, ServiceError

__all__ = ["BroadcastError", "BroadcastSender", "default_master_addr", "resolve_backend"]

log = logging.getLogger("opd.trainer.broadcast_sync")

#: Longest single wait on one replica's status (the HTTP read timeout must exceed it).
STATUS_POLL_S = 10.0


class BroadcastError(RuntimeError):
    """A broadcast failed; the group is torn down.

    ``status`` is the HTTP status of a replica's refusal (409: version not newer), if any.
    ``swapped``: base URLs of the replicas that had already swapped the version in (each
    replica's swap is atomic, the set of replicas is not); every other replica serves its old
    weights under its old version.
    """

    def __init__(
        self, message: str, *, status: int | None = None, swapped: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.swapped = list(swapped)


def default_master_addr(replicas: Sequence[RolloutClient]) -> str:
    """This host's address on the route to the first replica (``sync.broadcast_addr: null``)."""
    url = httpx.URL(replicas[0].base_url)
    return local_host_towards(url.host, url.port or (443 if url.scheme == "https" else 80))


def resolve_backend(backend: Literal["auto", "gloo", "nccl"]) -> Literal["gloo", "nccl"]:
    """``auto``: NCCL when this process has CUDA and NCCL, else gloo."""
    if backend != "auto":
        return backend
    nccl = torch.cuda.is_available() and torch.distributed.is_nccl_available()
    return "nccl" if nccl else "gloo"


class BroadcastSender:
    """Sends state dicts to ``replicas`` over one lazily set up broadcast group.

    ``master_addr``: this host as the replicas reach it (the TCPStore and gloo bind to it);
    ``master_port``: the TCPStore's port (None: a free one); ``backend``: ``auto``, ``gloo``
    or ``nccl``; ``bucket_bytes``: bytes per broadcast at most; ``timeout_s``: joining, each
    bucket and each swap fail after this long. Not thread-safe: one send at a time.
    """

    def __init__(
        self,
        replicas: Sequence[RolloutClient],
        *,
        master_addr: str,
        master_port: int | None,
        backend: str,
        bucket_bytes: int,
        timeout_s: float,
    ) -> None:
        if not replicas:
            raise ValueError("BroadcastSender needs at least one replica")
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, not {backend!r}")
        self.replicas = list(replicas)
        self.master_addr = master_addr
        self.master_port = master_port
        self.backend = resolve_backend(backend)  # type: ignore[arg-type]
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = float(timeout_s)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )
        self.group_name: str | None = None
        self._store: Any = None
        self._group: Any = None

    @property
    def world_size(self) -> int:
        """The trainer plus every replica."""
        return len(self.replicas) + 1

    # ------------------------------------------------------------------ public

    def send(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Make every replica serve ``state`` as ``version``. Tensors are sent as they are
        (cast them to the sync dtype first, gather FSDP shards first); any device.

        Raises:
            BroadcastError: anything failed; the group is torn down. Replicas not in its
                ``swapped`` serve their old weights under their old version.
            ValueError: ``state`` is empty or holds a dtype the wire does not carry.
        """
        names = list(state)
        tensors = [state[name] for name in names]
        manifest = [
            BroadcastTensor(name=n, shape=list(t.shape), dtype=_dtype_name(n, t))
            for n, t in zip(names, tensors, strict=True)
        ]
        if not manifest:
            raise ValueError("nothing to broadcast: the state dict is empty")
        started = time.perf_counter()
        swapped: list[str] = []
        try:
            if self._group is None:
                self._setup()
            assert self.group_name is not None
            request = BroadcastRequest(
                version=version,
                group_name=self.group_name,
                tensors=manifest,
                bucket_bytes=self.bucket_bytes,
            )
            body = request.model_dump(mode="json")
            for replica in self.replicas:
                self._call(replica, "POST", "/v1/weights/broadcast", body)
            self._send_buckets(request, tensors)
            for replica in self.replicas:
                self._await_swap(replica, version)
                swapped.append(replica.base_url)
        except BaseException as exc:
            self._teardown()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, BroadcastError):
                exc.swapped = swapped
                raise
            raise BroadcastError(
                f"weight broadcast of version {version} failed: {describe_error(exc)}",
                swapped=swapped,
            ) from exc
        log.info(
            "broadcast version %d to %d replica(s) in %.2fs (%s)",
            version,
            len(self.replicas),
            time.perf_counter() - started,
            self.backend,
        )

    def close(self) -> None:
        """Tear the group down on both sides (idempotent)."""
        self._teardown()

    # ------------------------------------------------------------------ internals

    def _setup(self) -> None:
        """Host the store, ask every replica to join, then join as rank 0."""
        from torch.distributed import TCPStore

        timeout = timedelta(seconds=self.timeout_s)
        host = resolve_host(self.master_addr)
        self._store = TCPStore(
            host,
            self.master_port or 0,
            world_size=None,
            is_master=True,
            wait_for_workers=False,
            timeout=timeout,
        )
        self.group_name = f"opd-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        for rank, replica in enumerate(self.replicas, start=1):
            init = BroadcastInitRequest(
                master_addr=self.master_addr,
                master_port=self._store.port,
                rank=rank,
                world_size=self.world_size,
                backend=self.backend,  # type: ignore[arg-type]
                group_name=self.group_name,
                timeout_s=self.timeout_s,
            )
            self._call(replica, "POST", "/v1/weights/broadcast/init", init.model_dump())
        self._group = open_group(
            self.backend,
            prefixed_store(self._store, self.group_name),
            0,
            self.world_size,
            self.timeout_s,
            host=host,
            device=self.device,
        )
        log.info(
            "weight broadcast group %s up: %d replica(s), %s, store %s:%d",
            self.group_name,
            len(self.replicas),
            self.backend,
            self.master_addr,
            self._store.port,
        )

    def _send_buckets(self, request: BroadcastRequest, tensors: list[torch.Tensor]) -> None:
        plan = request.bucket_plan()
        where = bucket_device(self.backend, self.device)
        buffer = torch.empty(max(b.nbytes for b in plan), dtype=torch.uint8, device=where)
        for index, bucket in enumerate(plan):
            flat = buffer[: bucket.nbytes]
            pack(bucket, tensors, flat)
            self._broadcast_bucket(index, flat)

    def _broadcast_bucket(self, index: int, flat: torch.Tensor) -> None:
        """One bucket out to every replica (rank 0 is the root); a hook for tests."""
        self._group.broadcast(flat, root=0).wait()

    def _await_swap(self, replica: RolloutClient, version: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            wait = max(0.0, min(STATUS_POLL_S, deadline - time.monotonic()))
            raw = self._call(replica, "GET", "/v1/weights/broadcast", params={"wait_s": wait})
            status = BroadcastStatus.model_validate(raw)
            if status.state != "receiving":
                break
            if time.monotonic() >= deadline:
                raise BroadcastError(
                    f"{replica.base_url}: still receiving version {version} after "
                    f"{self.timeout_s:.0f}s ({status.buckets_received} of {status.buckets} "
                    "buckets)"
                )
        if status.version != version or status.result != "ok":
            raise BroadcastError(
                f"{replica.base_url}: version {version} was not swapped in: "
                f"{status.error or status.state} (serving policy_version "
                f"{status.policy_version})"
            )

    def _call(
        self,
        replica: RolloutClient,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        try:
            return replica.request(method, path, json=body, params=params).json()
        except ServiceError as exc:
            raise BroadcastError(str(exc), status=exc.status) from exc

    def _teardown(self) -> None:
        """Close our end now (peers blocked on a bucket fail at once), then tell each replica.

        The DELETEs go out once, without the clients' retries: a replica that is down needs
        no teardown, and the caller's fallback must not wait minutes for it. Each names the
        group, so a late one can never drop a newer group.
        """
        name, had_group = self.group_name, self._group is not None or self._store is not None
        self._group = self._store = None
        self.group_name = None
        gc.collect()  # the backend object closes its connections when it is freed
        if not had_group or name is None:
            return
        for replica in self.replicas:
            try:
                # The clients' pool, for its base URL and API key; one attempt, short timeout.
                replica._http.request(
                    "DELETE", "/v1/weights/broadcast", params={"group_name": name}, timeout=5.0
                )
            except Exception as exc:  # noqa: BLE001 - best effort: the replica recovers anyway
                log.warning(
                    "%s: tearing down broadcast group %s failed: %s",
                    replica.base_url,
                    name,
                    describe_error(exc),
                )


def _dtype_name(name: str, tensor: torch.Tensor) -> str:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in BROADCAST_DTYPES:
        raise ValueError(f"{name}: dtype {dtype} cannot be broadcast ({sorted(BROADCAST_DTYPES)})")
    return dtype
