"""The process group of a weight broadcast, and the bucket byte layout (both sides use it).

The trainer (rank 0) and every rollout replica join one group of their own: a
`torch.distributed.TCPStore` hosted by the trainer, a `PrefixStore` named after the group, and
a backend object built on it directly (`ProcessGroupGloo` / `ProcessGroupNCCL`), never through
`torch.distributed.init_process_group`. So the group is invisible to the `torch.distributed.*`
globals and cannot collide with the trainer's own default group (torchrun, FSDP); several
groups can exist one after the other in one process. Collectives are called on the backend
object (`group.broadcast(tensor, root=0).wait()`).

A group is dropped by dropping every reference to it: that closes its connections at once
(`ProcessGroupGloo.shutdown()` / `abort()` do not), so peers blocked in a broadcast fail with
"connection closed" instead of waiting for the timeout. Gloo connects every pair of ranks,
so replicas must reach each other as well as the trainer; each rank binds gloo to the local
address on its route to the trainer (or to `GLOO_SOCKET_IFNAME` when set).

The trainer imports this module too (`trainer.broadcast_sync`): the byte layout of a bucket
must be the same on both sides. So does the vllm backend's weight-transfer engine
(`services.engine.vllm.weight_transfer`), which joins and receives inside vLLM's worker
process with `join_group` and `receive_buckets`, exactly as the rollout service does for hf.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from services.protocol import BroadcastBucket, BroadcastInitRequest, BroadcastTensor


class BroadcastCancelled(Exception):
    """The broadcast was cancelled (DELETE, shutdown) before it was swapped in."""


def _address(addr: str, port: int | None, kind: int) -> tuple[int, Any]:
    """`(family, sockaddr)` of `addr`, IPv4 first (every rank must agree on the family)."""
    infos = socket.getaddrinfo(addr, port, type=kind)
    family, _, _, _, sockaddr = min(infos, key=lambda info: info[0] != socket.AF_INET)
    return family, sockaddr


def local_host_towards(addr: str, port: int) -> str:
    """This host's address on the route to `addr` (no packet is sent); `OSError` if none."""
    family, sockaddr = _address(addr, port, socket.SOCK_DGRAM)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(sockaddr)
        return str(sock.getsockname()[0])


def resolve_host(addr: str) -> str:
    """`addr` as an IP address (gloo binds to it); `OSError` if it does not resolve."""
    return str(_address(addr, None, socket.SOCK_STREAM)[1][0])


def open_group(
    backend: str,
    store: Any,
    rank: int,
    world_size: int,
    timeout_s: float,
    *,
    host: str,
    device: torch.device,
) -> Any:
    """Join the group on `store` as `rank` (blocks until every rank joined or `timeout_s`).

    `host`: the local address gloo binds to; `device`: the CUDA device NCCL runs on.
    """
    from torch.distributed import ProcessGroupGloo

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        iface = os.environ.get("GLOO_SOCKET_IFNAME")
        opts._devices = [
            ProcessGroupGloo.create_device(interface=iface.split(",")[0])
            if iface
            else ProcessGroupGloo.create_device(hostname=host)
        ]
        group = ProcessGroupGloo(store, rank, world_size, opts)
    elif backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        torch.cuda.set_device(device)
        nccl_opts = ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        group = ProcessGroupNCCL(store, rank, world_size, nccl_opts)
        group.eager_connect_single_device(device)
    else:
        raise ValueError(f"unknown broadcast backend {backend!r}")
    # A first collective: every rank has connected to every other once it returns.
    probe = torch.zeros(1, dtype=torch.uint8, device=bucket_device(backend, device))
    group.broadcast(probe, root=0).wait()
    return group


def join_group(req: BroadcastInitRequest, *, host: str, device: torch.device) -> tuple[Any, Any]:
    """A replica's side: connect to the trainer's TCPStore and join; `(store, group)`."""
    from torch.distributed import TCPStore

    store = TCPStore(
        req.master_addr,
        req.master_port,
        world_size=None,
        is_master=False,
        timeout=timedelta(seconds=req.timeout_s),
    )
    group = open_group(
        req.backend,
        prefixed_store(store, req.group_name),
        req.rank,
        req.world_size,
        req.timeout_s,
        host=host,
        device=device,
    )
    return store, group


def describe_error(exc: BaseException) -> str:
    """`Type: first line` of an exception (gloo's messages go on for a while)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def prefixed_store(store: Any, group_name: str) -> Any:
    """The group's own key space in a (possibly shared) TCPStore."""
    from torch.distributed import PrefixStore

    return PrefixStore(f"opd-broadcast/{group_name}/", store)


def bucket_device(backend: str, device: torch.device) -> torch.device:
    """Where bucket buffers live: CPU for gloo, the CUDA device for NCCL."""
    return device if backend == "nccl" else torch.device("cpu")


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's data as a flat `uint8` view (a copy when not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def pack(bucket: BroadcastBucket, tensors: list[torch.Tensor], out: torch.Tensor) -> None:
    """Copy the bucket's tensors (`tensors[i]` for manifest index i) into `out[:nbytes]`."""
    for index, offset in bucket.tensors:
        data = tensor_bytes(tensors[index])
        out[offset : offset + data.numel()].copy_(data)


def unpack(bucket: BroadcastBucket, data: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Copy a received bucket's bytes (on CPU) into the staging tensors it carries."""
    for index, offset in bucket.tensors:
        target = staging[index]
        if target.numel() == 0:
            continue
        view = (
            target.reshape(-1).view(torch.uint8)
            if target.dtype != torch.uint8
            else (target.reshape(-1))
        )
        view.copy_(data[offset : offset + view.numel()])


def receive_buckets(
    group: Any,
    tensors: Sequence[BroadcastTensor],
    plan: Sequence[BroadcastBucket],
    *,
    backend: str,
    device: torch.device,
    cancel: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """A replica's side of one broadcast: every bucket of `plan` from rank 0, unpacked into
    fresh CPU staging tensors (`result[i]` for manifest entry `tensors[i]`); blocking.

    Raises `BroadcastCancelled` when `cancel` is set between buckets, and `RuntimeError`
    naming the bucket when one fails (the sender closed, the group's timeout passed).
    `progress(n)` is called after the n-th bucket arrived.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    staging = [torch.empty(t.shape, dtype=getattr(torch, t.dtype)) for t in tensors]
    where = bucket_device(backend, device)
    buffer = torch.empty(max(b.nbytes for b in plan), dtype=torch.uint8, device=where)
    total = len(plan)
    for i, bucket in enumerate(plan):
        if cancel is not None and cancel.is_set():
            raise BroadcastCancelled(f"cancelled after {i} of {total} buckets")
        flat = buffer[: bucket.nbytes]
        try:
            group.broadcast(flat, root=0).wait()
        except Exception as exc:
            message = f"receiving bucket {i + 1} of {total} failed: {describe_error(exc)}"
            raise RuntimeError(message) from exc
        unpack(bucket, flat if flat.device.type == "cpu" else flat.cpu(), staging)
        if progress is not None:
            progress(i + 1)
    return staging
