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
check up front, and if vLLM still fails the previous directory is reloaded before
`WeightsError` is raised; if even that fails the engine marks itself broken and every later
call raises `RuntimeError`. So the directory of the serving weights must stay on disk until a
newer update succeeds: the rollout service's `WeightsManager` keeps its own copy (links) of it
for exactly that reason.

No broadcast transport (`POST /v1/weights/broadcast` answers 501 on this backend: the engine
keeps `Engine.load_weights_from_tensors`' default). vLLM 0.32 has its own weight transfer
(`AsyncLLM.init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update`, `vllm.distributed.weight_transfer.nccl_engine`), but it is NCCL only
(a PyNccl communicator per GPU worker), must be enabled when the engine starts
(`weight_transfer_config`), speaks its own packed wire format (the trainer would have to
drive `NCCLTrainerWeightTransferEngine`, not the gloo/NCCL buckets of
`services.student_rollout.broadcast_group`), and loads each tensor into the live model as it
arrives, so an interrupted transfer needs a reload from disk to undo. Wiring it in needs a GPU
host to test on; until then vLLM replicas take weights by load or upload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..base import WeightsError
from ..checkpoint import ReferenceCheckpoint, validate_checkpoint_dir

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("opd.engine.vllm")


class ServedWeights:
    """Where the served weights came from, and how to swap them for a checkpoint's."""

    def __init__(self) -> None:
        # Reference layout for weight updates, read from the initial checkpoint's headers.
        self.reference = ReferenceCheckpoint(None, None, "the engine is not started")
        # The directory the weights now being served came from: what a failed reload restores.
        # The caller keeps it in place until a newer update succeeds (`WeightsManager`).
        self.source: str | None = None
        # Why the model is unusable: a failed reload that could not be undone.
        self.broken: str | None = None
        self._update_lock = asyncio.Lock()

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
        async with self._update_lock:
            t0 = time.perf_counter()
            # In-flight requests finish on the old weights; new ones wait until resume.
            await llm.pause_generation(mode="wait", clear_cache=True)
            try:
                try:
                    await llm.collective_rpc(
                        "reload_weights",
                        kwargs={"weights_path": str(path), "is_checkpoint_format": True},
                    )
                except Exception as exc:  # noqa: BLE001 - any failure: put the old weights back
                    await self._restore_after_failed_reload(llm, path, exc)
                else:
                    self.source = str(path)
            finally:
                try:
                    await reset_prefix_cache(llm)
                finally:
                    await llm.resume_generation()
            logger.info("loaded weights from %s in %.2f s", path, time.perf_counter() - t0)

    async def _restore_after_failed_reload(
        self, llm: AsyncLLM, path: Path, exc: Exception
    ) -> None:
        """A reload that fails half-way leaves the model broken: reload the previous weights.

        Raises `WeightsError` when the previous weights are back, `RuntimeError` otherwise."""
        logger.error("vLLM failed to load %s: %s", path, exc)
        if self.source is not None:
            try:
                await llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_path": self.source, "is_checkpoint_format": True},
                )
            except Exception as restore_exc:  # noqa: BLE001
                logger.error("restoring %s failed too: %s", self.source, restore_exc)
            else:
                raise WeightsError(
                    f"vLLM failed to load {str(path)!r} ({exc}); the previous weights from "
                    f"{self.source!r} were reloaded"
                ) from exc
        self.broken = f"a failed weight load from {str(path)!r} left the model broken: {exc}"
        raise RuntimeError(self.broken) from exc


async def reset_prefix_cache(llm: AsyncLLM) -> None:
    """Drop every cached KV block: they were computed with the old weights."""
    if not await llm.reset_prefix_cache():
        # Only fails while requests hold blocks; preempting them (they recompute) is
        # better than ever serving stale KV.
        await llm.reset_prefix_cache(reset_running_requests=True)
