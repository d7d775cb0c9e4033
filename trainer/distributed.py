"""More than one device: FSDP2 sharding of the student and the few collectives the loop needs.

Under ``torchrun --nproc-per-node N -m trainer cfg.yaml`` every rank holds a shard of the
student (``torch.distributed.fsdp.fully_shard`` on each decoder layer, then on the root).
Rank 0 alone talks HTTP: it draws prompts, gets rollouts and teacher scores, and broadcasts the
batch; every rank trains on its share of the micro-batches; rank 0 gathers the full state dict
to push weights and to write checkpoints. Backend: NCCL on CUDA, gloo on CPU (the tests run two
CPU processes). A single process (no ``WORLD_SIZE``) needs no process group at all.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import FatalError

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "full_state_dict",
    "gather_objects",
    "init_distributed",
    "load_optimizer_state",
    "on_main",
    "optimizer_state",
    "shard_policy",
    "shutdown",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank (its device index)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use (world size > 1)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that does HTTP, logging and writing."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else stay single."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        # Rank 0 may spend minutes in HTTP (rollouts) while the others wait in a broadcast.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (if any)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_policy(
    policy: nn.Module, ctx: DistContext, *, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer (transformers' ``_no_split_modules``),
    then the root (embeddings, final norm, output projection -- tied weights stay in one unit).

    ``param_dtype`` (e.g. bf16) makes FSDP all-gather parameters in that dtype while the
    sharded master weights and the gradient reduction stay float32.
    """
    if not ctx.enabled:
        return policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    causal_lm = getattr(policy, "causal_lm", policy)
    layer_types = set(getattr(causal_lm, "_no_split_modules", None) or [])
    layers = [m for m in policy.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise RuntimeError(
            f"{type(causal_lm).__name__} declares no _no_split_modules; cannot find its layers "
            "to shard"
        )
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    return policy


def barrier(ctx: DistContext) -> None:
    """All ranks meet here."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; fine for a batch of numpy arrays)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


class _Abort:
    """Broadcast by rank 0 instead of a result when it hit an error (other ranks stop too)."""

    def __init__(self, message: str) -> None:
        self.message = message


def on_main(fn: Callable[[], T], ctx: DistContext, what: str, *, share: bool = False) -> T | None:
    """Run ``fn`` on rank 0 only; if it raises, every rank raises, so none is left waiting in
    a collective. Collective.

    Rank 0 re-raises its own error, the others a :class:`FatalError` naming it (``what`` says
    what rank 0 was doing). ``share=True``: every rank returns rank 0's result (pickled);
    otherwise the other ranks return None.
    """
    result: T | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:
            error = exc
    if error is not None:
        status: Any = _Abort(f"{what}: {type(error).__name__}: {error}")
    else:
        status = result if share else None
    status = broadcast_object(status, ctx)
    if error is not None:
        raise error
    if isinstance(status, _Abort):
        raise FatalError(f"rank 0 failed while {status.message}")
    return status if share else result


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for convenience)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_state_dict(module: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on CPU, on rank 0 (None on other ranks). Collective."""
    if not ctx.enabled:
        return {k: v.detach() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state if ctx.is_main else None


def optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any] | None:
    """Optimizer state keyed by parameter name (full, on rank 0; None elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not ctx.enabled:
        return get_optimizer_state_dict(module, optimizer)
    state = get_optimizer_state_dict(
        module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state if ctx.is_main else None


def load_optimizer_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any] | None,
    ctx: DistContext,
) -> None:
    """Inverse of :func:`optimizer_state` (rank 0's copy is broadcast to the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not ctx.enabled:
        assert state is not None
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state)
        return
    set_optimizer_state_dict(
        module,
        optimizer,
        optim_state_dict=state if ctx.is_main else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
