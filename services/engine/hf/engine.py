"""`HFEngine`: the transformers backend behind the `Engine` interface.

It ties together the model (`model`), the scheduler that batches all model work
(`scheduler`), scoring (`scoring`), generation with its stop rules (`generation`), the
sampling math (`sampling`) and weight updates (`weights`); each module's docstring gives its
part of the semantics, which are kept close to vLLM's because this backend is the reference
the `vllm` one is tested against.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# The same names as the vllm backend imports: an import list, not logic.
from ..base import (
    Engine,
    EngineConfig,
    EngineInfo,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
)
from ..checkpoint import reference_checkpoint
from ..fingerprint import combine_components, fingerprint_components
from ..validation import check_generate_request, check_score_inputs
from .generation import GroupStepper, new_request
from .model import ModelRunner
from .prefix import score_shared
from .scheduler import Scheduler
from .scoring import score_batch
from .weights import ModelWeights


class HFEngine(Engine):
    """transformers backend (see the package modules for the exact semantics)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._info: EngineInfo | None = None
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self.weights: ModelWeights | None = None
        self._stepper: GroupStepper | None = None
        self._observer: Callable[[str, int], None] | None = None
        self._prefix_sharing = True

    # ------------------------------------------------------------------ lifecycle

    @property
    def model(self) -> Any:
        """The loaded `PreTrainedModel` (read-only use; forwards must hold the runner's lock)."""
        return self.runner.model if self.runner is not None else None

    @property
    def batch_observer(self) -> Callable[[str, int], None] | None:
        """Optional hook `(op, sequences)` called from the worker thread after each score
        forward (`op="score"`) and each generation prefill (`op="generate"`, rows)."""
        return self._observer

    @batch_observer.setter
    def batch_observer(self, observer: Callable[[str, int], None] | None) -> None:
        self._observer = observer
        if self._stepper is not None:
            self._stepper.observer = observer

    @property
    def prefix_sharing(self) -> bool:
        """Whether scoring computes a prefix shared by several sequences of a batch once
        (`prefix`; on by default, exact to float32 rounding). Setting it takes effect from the
        next batch; models whose cache is not plain full attention never share."""
        return self._prefix_sharing

    @prefix_sharing.setter
    def prefix_sharing(self, on: bool) -> None:
        self._prefix_sharing = bool(on)
        if self.scheduler is not None and self.runner is not None:
            self.scheduler.prefix_sharing = self._prefix_sharing and self.runner.prefix_cache_ok

    @property
    def weights_source(self) -> str | None:
        """The checkpoint directory of the weights being served."""
        source = self.weights.source if self.weights is not None else None
        return None if source is None else str(source)

    async def start(self) -> None:
        """Load tokenizer and model (in a worker thread) and start the scheduler."""
        if self.scheduler is not None and self.scheduler.running:
            return
        await asyncio.to_thread(self._load)
        assert self.scheduler is not None
        self.scheduler.start()

    def _load(self) -> None:
        tokenizer = self.tokenizer
        runner = ModelRunner(self.config, tokenizer)
        self.weights = ModelWeights(runner, reference_checkpoint(self.config.model))
        self._stepper = GroupStepper(runner, tokenizer)
        self._stepper.observer = self._observer
        budget = self.config.max_batch_tokens

        def score(inputs: list[ScoreInput], shared: bool) -> list[ScoreResult]:
            if shared:
                return score_shared(runner, inputs, budget, self._observer)
            return score_batch(runner, inputs, self._observer)

        self.scheduler = Scheduler(
            self.config, score, self._stepper, runner.device,
            prefix_sharing=self._prefix_sharing and runner.prefix_cache_ok,
        )
        self.runner = runner
        parts = fingerprint_components(tokenizer)
        self._info = EngineInfo(
            model=self.config.model,
            served_model_name=self.config.served_model_name or self.config.model,
            backend="hf",
            dtype=str(runner.dtype).removeprefix("torch."),
            device=str(runner.device),
            max_model_len=runner.max_model_len,
            vocab_size=runner.vocab_size,
            tokenizer_fingerprint=combine_components(parts),
            tokenizer_fingerprint_components=parts,
            eos_token_ids=list(runner.eos_ids),
        )

    async def shutdown(self) -> None:
        """Stop the scheduler, fail whatever is still queued, and free the model."""
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.runner is not None:
            self.runner.free()
        self.weights = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def info(self) -> EngineInfo:
        """Static facts about the loaded model (after `start`)."""
        if self._info is None:
            raise RuntimeError("the engine is not started")
        return self._info

    def health(self) -> str | None:
        """Why the engine cannot serve: a failed weight copy that could not be undone."""
        return self.weights.broken if self.weights is not None else None

    # ------------------------------------------------------------------ work

    def _running(self) -> tuple[ModelRunner, Scheduler]:
        runner, scheduler = self.runner, self.scheduler
        if runner is None or runner.model is None or scheduler is None or not scheduler.running:
            raise RuntimeError("the engine is not running")
        if self.weights is not None and self.weights.broken:
            raise RuntimeError(f"the engine is unusable: {self.weights.broken}")
        return runner, scheduler

    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Per-token logprobs of `token_ids[start:]` for each input (float32 log-softmax of
        `logits / temperature`), with the `top_k` most likely tokens when asked."""
        runner, scheduler = self._running()
        inputs = list(inputs)
        check_score_inputs(inputs, vocab_size=runner.vocab_size,
                           max_model_len=runner.max_model_len)
        if not inputs:
            return []
        return await scheduler.score(inputs)

    async def generate(
        self, prompts: Sequence[list[int]], spec: SamplingSpec
    ) -> list[list[GeneratedSample]]:
        """`spec.n` samples for each prompt; outer list follows `prompts`."""
        runner, scheduler = self._running()
        checked = check_generate_request(prompts, spec, vocab_size=runner.vocab_size,
                                         max_model_len=runner.max_model_len)
        if not checked:
            return []
        future = asyncio.get_running_loop().create_future()
        return await scheduler.generate(new_request(checked, spec, future, runner.max_model_len))

    async def load_weights(self, checkpoint_dir: str) -> None:
        """Swap in the weights of a safetensors checkpoint directory.

        The directory is checked against the initial checkpoint (names, shapes, dtypes) and
        read before anything changes; a misfit raises `WeightsError` and the old weights keep
        serving. The copy happens between generations (see `scheduler`). The directory must
        stay in place while its weights serve: a later failed copy restores from it.
        """
        self._running()
        weights = self.weights
        assert weights is not None
        path = Path(checkpoint_dir).expanduser().resolve()
        tensors = await asyncio.to_thread(weights.read, path)
        assert self.scheduler is not None
        await self.scheduler.update(lambda: weights.swap(tensors, path))

    def tensor_weights_unsupported(self) -> str | None:
        """This backend takes weights as tensors (the broadcast transport)."""
        return None

    async def load_weights_from_tensors(self, tensors: Mapping[str, Any], source: str) -> None:
        """Swap in `{name: tensor}` (e.g. received over a broadcast) like `load_weights`:
        the same checks first, the same copy between generations; the tensors are kept as
        what a later failed copy restores (see `weights`)."""
        self._running()
        weights = self.weights
        assert weights is not None and self.scheduler is not None
        staged = dict(tensors)
        await asyncio.to_thread(weights.check_tensors, staged)
        await self.scheduler.update(lambda: weights.swap_in_memory(staged, source))
