"""The `hf` engine backend: a transformers model behind the `Engine` interface.

It runs on any device torch supports and is the reference the `vllm` backend is tested
against, so its semantics are spelled out here and kept close to vLLM's.

Scheduling
    All model work goes through one background task (the scheduler). `score` and `generate`
    only validate, enqueue and await a future. The scheduler coalesces queued work into forward
    batches and runs each forward in a worker thread (`asyncio.to_thread`), one at a time, under
    `_lock`, so the event loop stays responsive and no forward ever sees half-copied weights.
    When it wakes up idle it waits `batch_wait_ms` to let concurrent callers join a batch.

    - score: every queued sequence (from any number of requests) is sorted by length and packed
      into right-padded batches of at most `max_batch_tokens` padded tokens (a longer sequence
      runs alone). One forward per batch.
    - generate: a request becomes `len(prompts) * n` rows. Rows are admitted FIFO into
      *groups* (static batches, each with its own KV cache) while at most `max_num_seqs` rows
      decode in all and each group's prefill (distinct prompts x longest prompt, left-padded)
      stays within `max_batch_tokens` padded tokens (a lone row always goes). Rows of unseeded
      requests queued at the same time share a group (cross-request coalescing); a request with
      a `seed` always gets groups of its own (see Seeds). A group prefills each distinct prompt
      once (explicit `position_ids` so left padding does not shift positions), expands the
      cache to its `n` samples, then decodes one token per step; finished rows leave the batch
      (and its cache) at once. Every scheduling round runs the queued score batches and one
      decode step of each active group, so long generations never block scoring and new
      requests are admitted as rows free up. KV memory is bounded by
      `max_num_seqs * (prompt + max_tokens)` tokens; score memory by `max_batch_tokens x vocab`
      logits (model dtype) plus a bounded float32 chunk.

Failure isolation
    An exception in a batch that holds work of several requests re-runs each request on its own
    (score: immediately; generate: its rows are re-queued as an isolated group), so only the
    request whose work fails gets the exception. A cancelled caller's rows are dropped.

Sampling and logprobs (vLLM `logprobs_mode="processed_logprobs"`)
    For each row, per step: `l = logits.float() / T`; top-k then top-p filtering exactly as
    vLLM does (top-k keeps every token whose logit ties the k-th largest; top-p masks, in
    ascending order, the tokens whose cumulative probability is <= 1 - p, always keeping the
    most likely); `lp = log_softmax(l)` in float32 over the *filtered* logits (filtered tokens
    get -inf). The sampled token's reported logprob is `lp[token]`, i.e. its logprob under the
    distribution actually sampled from (post-temperature, post-filter, renormalised), and the
    `top_logprobs` alternatives are the top entries of the same `lp` (so, as in vLLM, they can
    hold -inf when more are asked for than the filter kept). With `top_p=1, top_k=-1`
    (the trainer's setting) this is exactly `log_softmax(logits / T)`. Greedy (`T < 1e-5`, as in
    vLLM) takes `argmax(logits)` and reports `log_softmax(logits)` (temperature 1, unfiltered).
    Sampling draws `q ~ Exp(1)` per vocabulary entry and takes `argmax(probs / q)` (an exact
    draw from `probs`).

Seeds
    Each row of a seeded request has its own `torch.Generator`, seeded from
    `(seed, prompt_index, sample_index)`, drawn from only by that row, once per step. A seeded
    request never shares a batch with another request, so its batches (and hence its forward
    numerics) depend only on the request itself. Guarantee: the same request (prompts, spec,
    seed) against the same weights, engine config and device returns the same token ids,
    logprobs and text, whatever else runs concurrently (bit-for-bit on CPU; on CUDA up to
    kernel determinism). Unseeded rows draw from a per-group generator seeded from the engine's
    `config.seed` stream.

Stopping (vLLM order and conventions)
    After each sampled token: the tokenizer's EOS (unless `ignore_eos`) -> `stop`, stop_reason
    None; another EOS id of the generation config, or a `stop_token_ids` entry -> `stop`,
    stop_reason = that id (an extra generation-config EOS is ignored with `ignore_eos`, as in
    vLLM); both are included in `token_ids` and excluded from `text`. Then stop strings,
    searched in the incrementally detokenized text (special tokens skipped): on a match
    `finish_reason="stop"`, `stop_reason` = the string, and `text` is cut *before* the stop
    string; `token_ids`/`logprobs` keep every sampled token up to and including the one that
    completed the stop string (exactly vLLM's output, and the tokens the policy actually
    produced, which is what OPD trains on). Finally `max_tokens`, or the prompt reaching
    `max_model_len`, -> `length`.

Weight updates
    `load_weights` reads and checks a safetensors directory off the event loop before touching
    the model (names, shapes and dtypes, strict; tied parameters such as `lm_head.weight` may be
    absent). The copy then waits until no generation is in flight (requests already started may
    finish; new ones wait), so no trajectory mixes two weight versions, and runs under `_lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import (
    Engine,
    EngineConfig,
    EngineInfo,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
    WeightsError,
)
from .fingerprint import combine_components, fingerprint_components
from .tokenization import load_tokenizer, resolve_eos_ids

logger = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"
"""vLLM `logprobs_mode` whose semantics this backend reproduces (see the module docstring)."""

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`)."""

# Positions whose float32 log-softmax is materialised at once when scoring: bounds the extra
# memory to ~512 MiB whatever the vocabulary (151k for Qwen -> ~880 positions per chunk).
_SCORE_CHUNK_ELEMS = 1 << 27

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- sampling math


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) what vLLM's top-k / top-p filter masks, row by row.

    `top_k[i] <= 0` or `>= vocab` and `top_p[i] >= 1` mean "off" for row `i`. Top-k keeps every
    token whose logit is >= the k-th largest (ties kept); top-p then sorts ascending, masks the
    tokens whose cumulative probability is <= 1 - p, and always keeps the most likely token.
    Returns a new tensor; `logits` is not modified.
    """
    vocab = logits.shape[-1]
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        use_k = (top_k > 0) & (top_k < vocab)
        k = torch.where(use_k, top_k, torch.full_like(top_k, vocab))
        threshold = sorted_logits.gather(1, (vocab - k).unsqueeze(1).long())
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        mask = (cumulative <= (1.0 - top_p).unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        mask[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of one row of a seeded request (well mixed, in [0, 2**63))."""
    state = np.random.SeedSequence([seed & (2**64 - 1), prompt_index, sample_index])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


# --------------------------------------------------------------------------- queued work


@dataclass(eq=False)
class _ScoreJob:
    """One `score` call: its future resolves when every input is scored."""

    inputs: list[ScoreInput]
    future: asyncio.Future
    results: list[ScoreResult | None]
    remaining: int


@dataclass(eq=False)
class _ScoreItem:
    job: _ScoreJob
    index: int
    inp: ScoreInput


@dataclass(eq=False)
class _GenRequest:
    """One `generate` call: `len(prompts) * n` rows, resolved when all have finished."""

    prompts: list[list[int]]
    spec: SamplingSpec
    future: asyncio.Future
    samples: list[list[GeneratedSample | None]]
    remaining: int
    pending: deque[_Row] = field(default_factory=deque)
    started: bool = False
    isolated: bool = False  # never shares a group (seeded, or failed inside a shared group)


@dataclass(eq=False)
class _Row:
    """One (prompt, sample) being generated."""

    req: _GenRequest
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    max_new: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] | None = None
    generator: torch.Generator | None = None
    # incremental detokenization, only used when the request has stop strings
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    final_text: str = ""
    dead: bool = False  # the request is done (cancelled / failed): drop this row
    delivered: bool = False  # its sample is in the request's result

    def reset(self) -> None:
        """Forget generated state (the row is re-queued after a failed shared batch)."""
        self.token_ids, self.logprobs = [], []
        self.top = [] if self.req.spec.top_logprobs > 0 else None
        self.generator = None
        self.text, self.prefix_offset, self.read_offset = "", 0, 0
        self.finish_reason, self.stop_reason, self.final_text = None, None, ""


@dataclass(eq=False)
class _Group:
    """A static generation batch with its own KV cache."""

    rows: list[_Row]  # rows still decoding
    generator: torch.Generator | None  # shared generator of an unseeded group
    requests: set[_GenRequest]
    members: tuple[_Row, ...] = ()  # every row the group started with
    prefilled: bool = False
    cache: Any = None
    attention_mask: torch.Tensor | None = None
    next_pos: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    temperature: torch.Tensor | None = None
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    use_k: bool = False
    use_p: bool = False
    greedy_mask: torch.Tensor | None = None
    all_greedy: bool = False
    any_greedy: bool = False
    max_top: int = 0


@dataclass(eq=False)
class _Update:
    tensors: dict[str, torch.Tensor]
    future: asyncio.Future
    source: str


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# --------------------------------------------------------------------------- the engine


class HFEngine(Engine):
    """transformers backend (see the module docstring for the exact semantics)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._tokenizer: Any = None
        self._model: Any = None
        self._info: EngineInfo | None = None
        self.device: torch.device | None = None
        self._lock = threading.Lock()
        self._eos_ids: list[int] = []
        self._vocab_size = 0
        self._max_model_len = 0
        self._supports_logits_to_keep = False
        self._expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._tie_groups: list[list[str]] = []
        self._params: dict[str, torch.Tensor] = {}
        self._rng = random.Random(config.seed)
        # scheduler state (only touched on the event loop)
        self._score_queue: deque[_ScoreItem] = deque()
        self._gen_queue: deque[_GenRequest] = deque()
        self._groups: list[_Group] = []
        self._updates: deque[_Update] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.batch_observer: Callable[[str, int], None] | None = None
        """Optional hook `(op, sequences)` called from the worker thread after each score
        forward (`op="score"`) and each generation prefill (`op="generate"`, rows)."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use if `start` has not run yet)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config)
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The loaded `PreTrainedModel` (read-only use; forwards must hold `_lock`)."""
        return self._model

    async def start(self) -> None:
        """Load tokenizer and model (in a worker thread) and start the scheduler."""
        if self._task is not None:
            return
        await asyncio.to_thread(self._load)
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hf-engine-scheduler")

    def _resolve_device(self) -> torch.device:
        if self.config.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.config.device)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        device = self._resolve_device()
        if self.config.dtype != "auto":
            dtype: Any = _DTYPES[self.config.dtype]
        elif device.type == "cpu":
            # Half precision on CPU is slow and loses the accuracy the reference is for.
            dtype = torch.float32
        else:
            dtype = "auto"  # the checkpoint's own dtype
        tokenizer = self.tokenizer
        model = AutoModelForCausalLM.from_pretrained(
            self.config.model, dtype=dtype, trust_remote_code=self.config.trust_remote_code
        )
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        self._model = model
        self.device = device
        self._supports_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

        out_emb = model.get_output_embeddings()
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(text_config.vocab_size)
        max_len = self.config.max_model_len or getattr(text_config, "max_position_embeddings", None)
        if not max_len:
            tok_max = getattr(tokenizer, "model_max_length", None)
            max_len = tok_max if tok_max and tok_max < 10**8 else 2048
        self._max_model_len = int(max_len)
        self._eos_ids = resolve_eos_ids(tokenizer, getattr(model, "generation_config", None))

        # Expected checkpoint layout; parameters that share one tensor (tied embeddings) form a
        # group of which a checkpoint needs only one name.
        state = model.state_dict(keep_vars=True)
        by_tensor: dict[int, list[str]] = {}
        for name, tensor in state.items():
            self._expected[name] = (tuple(tensor.shape), tensor.dtype)
            self._params[name] = tensor
            by_tensor.setdefault(id(tensor), []).append(name)
        self._tie_groups = list(by_tensor.values())

        parts = fingerprint_components(tokenizer)

        self._info = EngineInfo(
            model=self.config.model,
            served_model_name=self.config.served_model_name or self.config.model,
            backend="hf",
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            device=str(device),
            max_model_len=self._max_model_len,
            vocab_size=self._vocab_size,
            tokenizer_fingerprint=combine_components(parts),
            tokenizer_fingerprint_components=parts,
            eos_token_ids=list(self._eos_ids),
        )

    async def shutdown(self) -> None:
        """Stop the scheduler, fail whatever is still queued, and free the model."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        exc = RuntimeError("the engine is shutting down")
        for item in self._score_queue:
            _fail(item.job.future, exc)
        for req in self._gen_queue:
            _fail(req.future, exc)
        for group in self._groups:
            for req in group.requests:
                _fail(req.future, exc)
        for update in self._updates:
            _fail(update.future, exc)
        self._score_queue.clear()
        self._gen_queue.clear()
        self._groups.clear()
        self._updates.clear()
        with self._lock:
            self._model = None
            self._params = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def info(self) -> EngineInfo:
        """Static facts about the loaded model (after `start`)."""
        if self._info is None:
            raise RuntimeError("the engine is not started")
        return self._info

    # ------------------------------------------------------------------ public work API

    def _check_started(self) -> None:
        if self._task is None or self._model is None or self._closing:
            raise RuntimeError("the engine is not running")

    def _check_ids(self, ids: Sequence[int], where: str) -> None:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"{where}.token_ids: expected a list of integer token ids")
        bad = np.flatnonzero((arr < 0) | (arr >= self._vocab_size))
        if bad.size:
            pos = int(bad[0])
            raise ValueError(
                f"{where}.token_ids[{pos}]: token id {int(arr[pos])} is outside [0, {self._vocab_size})"
            )

    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Per-token logprobs of `token_ids[start:]` for each input (float32 log-softmax of
        `logits / temperature`), with the `top_k` most likely tokens when asked."""
        self._check_started()
        inputs = list(inputs)
        for i, inp in enumerate(inputs):
            where = f"sequences[{i}]"
            n = len(inp.token_ids)
            if n > self._max_model_len:
                raise ValueError(f"{where}: {n} tokens exceed max_model_len={self._max_model_len}")
            if not 1 <= inp.start <= n:
                raise ValueError(f"{where}.start={inp.start} must be in [1, {n}]")
            if not inp.temperature > 0:
                raise ValueError(f"{where}.temperature must be > 0")
            if not 0 <= inp.top_k <= self._vocab_size:
                raise ValueError(f"{where}.top_k={inp.top_k} must be in [0, {self._vocab_size}]")
            self._check_ids(inp.token_ids, where)
        if not inputs:
            return []
        future = asyncio.get_running_loop().create_future()
        job = _ScoreJob(inputs=inputs, future=future, results=[None] * len(inputs), remaining=len(inputs))
        self._score_queue.extend(_ScoreItem(job, i, inp) for i, inp in enumerate(inputs))
        self._wake()
        return await future

    async def generate(
        self, prompts: Sequence[list[int]], spec: SamplingSpec
    ) -> list[list[GeneratedSample]]:
        """`spec.n` samples for each prompt; outer list follows `prompts`."""
        self._check_started()
        if spec.n < 1:
            raise ValueError("n must be >= 1")
        if spec.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if spec.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < spec.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if spec.top_k < -1:
            raise ValueError("top_k must be -1 (off) or >= 1")
        if not 0 <= spec.top_logprobs <= self._vocab_size:
            raise ValueError(f"top_logprobs must be in [0, {self._vocab_size}]")
        if any(not s for s in spec.stop):
            raise ValueError("stop strings must be non-empty")
        for i, p in enumerate(prompts):
            where = f"prompts[{i}]"
            if len(p) == 0:
                raise ValueError(f"{where}: empty prompt")
            if len(p) >= self._max_model_len:
                raise ValueError(
                    f"{where}: {len(p)} tokens leave no room to generate within max_model_len={self._max_model_len}"
                )
            self._check_ids(p, where)
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            return []
        future = asyncio.get_running_loop().create_future()
        req = _GenRequest(
            prompts=prompts,
            spec=spec,
            future=future,
            samples=[[None] * spec.n for _ in prompts],
            remaining=len(prompts) * spec.n,
            isolated=spec.seed is not None,
        )
        for pi, p in enumerate(prompts):
            max_new = min(spec.max_tokens, self._max_model_len - len(p))
            for si in range(spec.n):
                row = _Row(req=req, prompt_index=pi, sample_index=si, prompt_ids=p, max_new=max_new)
                row.reset()
                req.pending.append(row)
        self._gen_queue.append(req)
        self._wake()
        return await future

    async def load_weights(self, checkpoint_dir: str) -> None:
        """Swap in the weights of a safetensors directory (all `*.safetensors` files in it).

        Every tensor is read and checked against the model (names, shapes, dtypes; strict)
        before anything changes; a misfit raises `WeightsError` and the old weights keep
        serving. The copy happens between generations (see the module docstring)."""
        self._check_started()
        tensors = await asyncio.to_thread(self._read_checkpoint, checkpoint_dir)
        future = asyncio.get_running_loop().create_future()
        self._updates.append(_Update(tensors=tensors, future=future, source=str(checkpoint_dir)))
        self._wake()
        await future

    # ------------------------------------------------------------------ weights

    def _read_checkpoint(self, checkpoint_dir: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(checkpoint_dir)
        if not path.is_dir():
            raise WeightsError(f"checkpoint directory not found: {checkpoint_dir}")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"no *.safetensors files in {checkpoint_dir}")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                loaded = load_file(str(file), device="cpu")
            except Exception as exc:  # truncated / not safetensors / unreadable
                raise WeightsError(f"cannot read {file.name}: {exc}") from exc
            for name, tensor in loaded.items():
                if name in tensors:
                    raise WeightsError(f"tensor {name!r} appears in more than one file ({file.name})")
                tensors[name] = tensor
        self._check_checkpoint(tensors)
        return tensors

    def _check_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strict layout check; raises `WeightsError` naming every misfit."""
        unknown = sorted(set(tensors) - set(self._expected))
        missing = [group[0] for group in self._tie_groups if not any(n in tensors for n in group)]
        problems: list[str] = []
        if missing:
            problems.append(f"missing tensors: {missing[:20]}" + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
        if unknown:
            problems.append(f"unknown tensors: {unknown[:20]}" + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""))
        for name, tensor in tensors.items():
            if name not in self._expected:
                continue
            shape, dtype = self._expected[name]
            if tuple(tensor.shape) != shape:
                problems.append(f"tensor {name!r}: shape {list(tensor.shape)} != expected {list(shape)}")
            elif tensor.dtype != dtype:
                problems.append(
                    f"tensor {name!r}: dtype {str(tensor.dtype).removeprefix('torch.')} != expected "
                    f"{str(dtype).removeprefix('torch.')}"
                )
        if not problems:
            for group in self._tie_groups:
                present = [n for n in group if n in tensors]
                for other in present[1:]:
                    if not torch.equal(tensors[present[0]], tensors[other]):
                        problems.append(f"tied tensors {present[0]!r} and {other!r} differ")
        if problems:
            raise WeightsError("checkpoint does not fit the model: " + "; ".join(problems))

    def _apply_update(self, tensors: dict[str, torch.Tensor]) -> None:
        with self._lock, torch.no_grad():
            for group in self._tie_groups:
                name = next(n for n in group if n in tensors)
                self._params[group[0]].copy_(tensors[name], non_blocking=False)

    # ------------------------------------------------------------------ scheduler

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _has_work(self) -> bool:
        return bool(self._score_queue or self._gen_queue or self._groups or self._updates)

    async def _run(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            if not self._has_work():
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.config.batch_wait_ms > 0:
                    # Idle -> busy: give concurrent callers a moment to join the first batch.
                    await asyncio.sleep(self.config.batch_wait_ms / 1000.0)
                continue
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a scheduler bug must not stop the engine
                logger.exception("hf engine scheduler error")
                await asyncio.sleep(0.01)

    async def _tick(self) -> None:
        """One scheduling round: queued scores, a pending weight swap, admissions, one decode
        step of every active generation group."""
        if self._score_queue:
            items = list(self._score_queue)
            self._score_queue.clear()
            for batch in self._pack_score(items):
                await self._run_score_batch(batch)
        self._drop_dead_requests()
        if self._updates and not self._groups and not any(r.started for r in self._gen_queue):
            update = self._updates.popleft()
            try:
                await asyncio.to_thread(self._apply_update, update.tensors)
            except Exception as exc:
                logger.exception("weight update failed while copying")
                _fail(update.future, exc)
            else:
                if not update.future.done():
                    update.future.set_result(None)
            return
        self._admit()
        for group in list(self._groups):
            await self._step_group(group)

    # ---------------------------------------------------------------- score batches

    def _pack_score(self, items: list[_ScoreItem]) -> list[list[_ScoreItem]]:
        """Sort by length and cut into batches of <= max_batch_tokens padded tokens."""
        items = [it for it in items if not it.job.future.done()]
        items.sort(key=lambda it: len(it.inp.token_ids))
        batches: list[list[_ScoreItem]] = []
        current: list[_ScoreItem] = []
        for item in items:
            n = len(item.inp.token_ids)
            # ascending order: the new item is the longest, so the batch pads to n
            if current and (len(current) + 1) * n > self.config.max_batch_tokens:
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    async def _run_score_batch(self, batch: list[_ScoreItem]) -> None:
        batch = [it for it in batch if not it.job.future.done()]
        if not batch:
            return
        try:
            results = await asyncio.to_thread(self._score_forward, [it.inp for it in batch])
        except Exception as exc:
            jobs = list(dict.fromkeys(it.job for it in batch))
            if len(jobs) == 1:
                _fail(jobs[0].future, exc)
                return
            # Several requests shared the batch: re-run each alone so only the culprit fails.
            for job in jobs:
                await self._run_score_batch_single(job, [it for it in batch if it.job is job])
            return
        self._deliver_scores(batch, results)

    async def _run_score_batch_single(self, job: _ScoreJob, items: list[_ScoreItem]) -> None:
        try:
            results = await asyncio.to_thread(self._score_forward, [it.inp for it in items])
        except Exception as exc:
            _fail(job.future, exc)
            return
        self._deliver_scores(items, results)

    def _deliver_scores(self, items: list[_ScoreItem], results: list[ScoreResult]) -> None:
        for item, result in zip(items, results, strict=True):
            job = item.job
            if job.future.done():
                continue
            job.results[item.index] = result
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(list(job.results))

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        logits_to_keep: int,
    ) -> tuple[torch.Tensor, Any]:
        """One model forward: logits of the last `logits_to_keep` positions and the cache."""
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
        if cache is not None:
            kwargs["past_key_values"] = cache
        if self._supports_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self._model(**kwargs)
        logits = out.logits
        if logits.shape[1] != logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits, out.past_key_values if cache is not None else None

    def _score_forward(self, inputs: list[ScoreInput]) -> list[ScoreResult]:
        """Right-padded batch forward; float32 log-softmax of `logits / T` per sequence."""
        with self._lock, torch.inference_mode():
            if self._model is None:
                raise RuntimeError("the engine is shut down")
            device = self.device
            lengths = [len(inp.token_ids) for inp in inputs]
            width = max(lengths)
            ids = torch.zeros((len(inputs), width), dtype=torch.long)
            mask = torch.zeros((len(inputs), width), dtype=torch.long)
            for i, inp in enumerate(inputs):
                ids[i, : lengths[i]] = torch.tensor(inp.token_ids, dtype=torch.long)
                mask[i, : lengths[i]] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = torch.arange(width, device=device).unsqueeze(0).expand(len(inputs), -1)
            # Only positions >= min(start) - 1 predict a scored token.
            keep = width - (min(inp.start for inp in inputs) - 1)
            logits, _ = self._forward(ids, mask, positions, None, keep)
            offset = width - keep
            if self.batch_observer is not None:
                self.batch_observer("score", len(inputs))
            vocab = logits.shape[-1]
            chunk = max(1, _SCORE_CHUNK_ELEMS // vocab)
            results: list[ScoreResult] = []
            for i, inp in enumerate(inputs):
                first, last = inp.start - 1, lengths[i] - 1  # predicting positions [first, last)
                count = last - first
                token_lp = torch.empty(count, dtype=torch.float32, device=device)
                top_ids = torch.empty((count, inp.top_k), dtype=torch.long, device=device)
                top_lp = torch.empty((count, inp.top_k), dtype=torch.float32, device=device)
                for c0 in range(0, count, chunk):
                    c1 = min(count, c0 + chunk)
                    rows = logits[i, first + c0 - offset : first + c1 - offset].float()
                    lp = torch.log_softmax(rows / inp.temperature, dim=-1)
                    targets = ids[i, first + c0 + 1 : first + c1 + 1]
                    token_lp[c0:c1] = lp.gather(1, targets.unsqueeze(1)).squeeze(1)
                    if inp.top_k > 0:
                        vals, idx = torch.topk(lp, inp.top_k, dim=-1)
                        top_lp[c0:c1] = vals
                        top_ids[c0:c1] = idx
                results.append(
                    ScoreResult(
                        logprobs=token_lp.cpu().numpy().astype(np.float32),
                        top_token_ids=top_ids.cpu().numpy().astype(np.int32) if inp.top_k > 0 else None,
                        top_logprobs=top_lp.cpu().numpy().astype(np.float32) if inp.top_k > 0 else None,
                    )
                )
            return results

    # ---------------------------------------------------------------- generation groups

    def _drop_dead_requests(self) -> None:
        """Forget queued requests whose caller went away or that already failed."""
        if any(req.future.done() for req in self._gen_queue):
            self._gen_queue = deque(req for req in self._gen_queue if not req.future.done())

    def _admit(self) -> None:
        """Move queued rows into new groups: FIFO, at most `max_num_seqs` rows decoding in all,
        and each group's prefill (distinct prompts x longest prompt) within `max_batch_tokens`
        padded tokens (a lone row always fits). Rows of consecutive unseeded requests share a
        group; an isolated (seeded) request gets groups of its own."""
        rows_left = self.config.max_num_seqs - sum(len(g.rows) for g in self._groups)
        updating = bool(self._updates)
        while self._gen_queue and rows_left > 0:
            taken: list[_Row] = []
            prompts: set[tuple[int, int]] = set()
            width = 0
            requests: list[_GenRequest] = []
            for req in list(self._gen_queue):
                if updating and not req.started:
                    break  # hold new requests until the pending weight swap is done
                if req.isolated and taken:
                    break  # an isolated request starts its own group
                took = False
                while req.pending and rows_left > 0:
                    row = req.pending[0]
                    key = (id(req), row.prompt_index)
                    new_width = max(width, len(row.prompt_ids))
                    n_prompts = len(prompts) + (key not in prompts)
                    if taken and n_prompts * new_width > self.config.max_batch_tokens:
                        break
                    taken.append(req.pending.popleft())
                    prompts.add(key)
                    width = new_width
                    rows_left -= 1
                    took = True
                if took:
                    requests.append(req)
                    req.started = True
                if not req.pending:
                    self._gen_queue.remove(req)
                if req.pending or req.isolated:
                    break  # this group is full, or an isolated request's group is complete
            if not taken:
                return
            shared_gen = None
            if taken[0].req.spec.seed is None:
                shared_gen = torch.Generator(device=self.device).manual_seed(self._rng.getrandbits(63))
            self._groups.append(
                _Group(rows=taken, generator=shared_gen, requests=set(requests), members=tuple(taken))
            )

    async def _step_group(self, group: _Group) -> None:
        for row in group.rows:
            if row.req.future.done():
                row.dead = True
        try:
            finished = await asyncio.to_thread(self._group_step, group)
        except Exception as exc:
            self._groups.remove(group)
            self._group_failed(group, exc)
            return
        for row in finished:
            self._finish_row(row)
        if not group.rows:
            self._groups.remove(group)

    def _group_failed(self, group: _Group, exc: BaseException) -> None:
        live = [r for r in group.requests if not r.future.done()]
        if len(group.requests) == 1:
            for req in live:
                _fail(req.future, exc)
            return
        # A shared batch failed: retry each request alone so only the culprit fails.
        logger.warning("generation batch of %d requests failed (%s); retrying each alone", len(live), exc)
        for req in live:
            # every undelivered row, including any that finished inside the failed step
            rows = [r for r in group.members if r.req is req and not r.delivered]
            for row in reversed(rows):
                row.reset()
                req.pending.appendleft(row)
            req.isolated = True
            if rows and req not in self._gen_queue:
                self._gen_queue.appendleft(req)

    def _finish_row(self, row: _Row) -> None:
        req = row.req
        if req.future.done():
            return
        req.samples[row.prompt_index][row.sample_index] = GeneratedSample(
            token_ids=row.token_ids,
            logprobs=row.logprobs,
            text=row.final_text,
            finish_reason=row.finish_reason,  # type: ignore[arg-type]
            top_logprobs=row.top,
            stop_reason=row.stop_reason,
        )
        row.delivered = True
        req.remaining -= 1
        if req.remaining == 0:
            req.future.set_result([list(s) for s in req.samples])  # type: ignore[arg-type]

    # -- worker-thread side

    def _group_step(self, group: _Group) -> list[_Row]:
        """Prefill if needed, drop dead rows, sample one token per row, drop finished rows,
        and run the decode forward for the rest. Returns the rows that finished."""
        with self._lock, torch.inference_mode():
            if self._model is None:
                raise RuntimeError("the engine is shut down")
            if all(r.dead for r in group.rows):
                group.rows, group.cache = [], None
                return []
            if not group.prefilled:
                self._prefill(group)
            keep = [i for i, r in enumerate(group.rows) if not r.dead]
            if len(keep) != len(group.rows):
                self._select_rows(group, keep)
            if not group.rows:
                return []
            tokens, token_lps, top_vals, top_ids = self._sample(group)
            finished: list[_Row] = []
            keep = []
            for i, row in enumerate(group.rows):
                row.token_ids.append(tokens[i])
                row.logprobs.append(token_lps[i])
                if row.top is not None:
                    k = row.req.spec.top_logprobs
                    row.top.append(dict(zip(top_ids[i][:k], top_vals[i][:k], strict=True)))
                if self._check_finished(row):
                    finished.append(row)
                else:
                    keep.append(i)
            if not keep:
                group.rows = []
                group.cache = None
                return finished
            next_tokens = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=self.device)
            if len(keep) != len(group.rows):
                self._select_rows(group, keep)
            assert group.attention_mask is not None and group.next_pos is not None
            group.attention_mask = torch.cat(
                [group.attention_mask, group.attention_mask.new_ones((len(keep), 1))], dim=1
            )
            positions = group.next_pos.unsqueeze(1)
            logits, group.cache = self._forward(
                next_tokens.unsqueeze(1), group.attention_mask, positions, group.cache, 1
            )
            group.logits = logits[:, -1].float()
            group.next_pos = group.next_pos + 1
            return finished

    def _prefill(self, group: _Group) -> None:
        """Left-padded forward of each distinct prompt once; the cache is then expanded to the
        group's rows (n samples of a prompt share its prefill)."""
        from transformers import DynamicCache

        device = self.device
        keys: dict[tuple[int, int], int] = {}
        prompts: list[list[int]] = []
        row_src: list[int] = []
        for row in group.rows:
            key = (id(row.req), row.prompt_index)
            if key not in keys:
                keys[key] = len(prompts)
                prompts.append(row.prompt_ids)
            row_src.append(keys[key])
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        # Left padding: real tokens must still get positions 0..len-1.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        logits, cache = self._forward(ids, mask, positions, cache, 1)
        if self.batch_observer is not None:
            self.batch_observer("generate", len(group.rows))
        src = torch.tensor(row_src, dtype=torch.long, device=device)
        if row_src != list(range(len(prompts))):
            cache.batch_select_indices(src)
        group.cache = cache
        group.attention_mask = mask[src]
        group.next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)[src]
        group.logits = logits[:, -1].float()[src]

        specs = [row.req.spec for row in group.rows]
        greedy = [s.temperature < SAMPLING_EPS for s in specs]
        group.all_greedy = all(greedy)
        group.any_greedy = any(greedy)
        # Greedy rows sample at T=1 without filtering (vLLM resets top_p/top_k for them).
        temps = [1.0 if g else s.temperature for s, g in zip(specs, greedy, strict=True)]
        ks = [0 if g or s.top_k < 0 else s.top_k for s, g in zip(specs, greedy, strict=True)]
        ps = [1.0 if g else s.top_p for s, g in zip(specs, greedy, strict=True)]
        group.temperature = torch.tensor(temps, dtype=torch.float32, device=device)
        group.use_k = any(0 < k < self._vocab_size for k in ks)
        group.use_p = any(p < 1.0 for p in ps)
        group.top_k = torch.tensor(ks, dtype=torch.long, device=device)
        group.top_p = torch.tensor(ps, dtype=torch.float32, device=device)
        group.greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
        group.max_top = max(s.top_logprobs for s in specs)
        for row in group.rows:
            if row.req.spec.seed is not None:
                row.generator = torch.Generator(device=device).manual_seed(
                    row_seed(row.req.spec.seed, row.prompt_index, row.sample_index)
                )
        group.prefilled = True

    def _select_rows(self, group: _Group, keep: list[int]) -> None:
        """Keep only rows `keep` of every per-row tensor, the KV cache included."""
        group.rows = [group.rows[i] for i in keep]
        if not keep:
            group.cache = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        group.cache.batch_select_indices(idx)
        for name in ("attention_mask", "next_pos", "logits", "temperature", "top_k", "top_p", "greedy_mask"):
            setattr(group, name, getattr(group, name)[idx])

    def _sample(self, group: _Group) -> tuple[list[int], list[float], list[list[float]], list[list[int]]]:
        """Sample one token per row; returns tokens, their processed logprobs, and the top
        alternatives (values, ids) of the same processed distribution."""
        logits = group.logits
        assert logits is not None and group.temperature is not None
        scaled = logits / group.temperature.unsqueeze(1)
        scaled = apply_top_k_top_p(
            scaled, group.top_k if group.use_k else None, group.top_p if group.use_p else None
        )
        logprobs = torch.log_softmax(scaled, dim=-1)
        if group.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = logprobs.exp()
            noise = torch.empty_like(probs)
            if group.generator is not None:
                noise.exponential_(generator=group.generator)
            else:
                for i, row in enumerate(group.rows):
                    noise[i].exponential_(generator=row.generator)
            tokens = (probs / noise).argmax(dim=-1)
            if group.any_greedy:
                tokens = torch.where(group.greedy_mask, logits.argmax(dim=-1), tokens)
        token_lp = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        if group.max_top > 0:
            vals, idx = torch.topk(logprobs, group.max_top, dim=-1)
            top_vals, top_ids = vals.tolist(), idx.tolist()
        return tokens.tolist(), token_lp.tolist(), top_vals, top_ids

    def _check_finished(self, row: _Row) -> bool:
        """Apply the stop rules (vLLM's order) after the row's newest token."""
        spec = row.req.spec
        token = row.token_ids[-1]
        if not spec.ignore_eos and token in self._eos_ids:
            row.finish_reason = "stop"
            # vLLM: only the tokenizer's EOS is "eos"; other generation-config EOS ids act as
            # stop token ids and are reported as the stop reason.
            row.stop_reason = None if token == self._eos_ids[0] else token
            row.final_text = self._decode(row.token_ids[:-1])
            return True
        if token in spec.stop_token_ids:
            row.finish_reason, row.stop_reason = "stop", token
            row.final_text = self._decode(row.token_ids[:-1])
            return True
        if spec.stop:
            hit = self._find_stop(row)
            if hit is not None:
                row.finish_reason, row.stop_reason = "stop", hit
                row.final_text = self._cut_at_stop(row, hit)
                return True
        if len(row.token_ids) >= row.max_new:
            row.finish_reason = "length"
            row.final_text = self._decode(row.token_ids)
            return True
        return False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def _find_stop(self, row: _Row) -> str | None:
        """Detokenize the newest token incrementally and look for a stop string that ends in
        the new text; of several, the one that completes earliest (ties: list order)."""
        ids = row.token_ids
        before = self._decode(ids[row.prefix_offset : row.read_offset])
        after = self._decode(ids[row.prefix_offset :])
        # Wait while the newest bytes are an incomplete UTF-8 character.
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None
        delta = after[len(before) :]
        row.prefix_offset, row.read_offset = row.read_offset, len(ids)
        row.text += delta
        best: str | None = None
        best_end = None
        for stop in row.req.spec.stop:
            at = row.text.find(stop, max(0, len(row.text) - len(delta) - len(stop) + 1))
            if at >= 0 and (best_end is None or at + len(stop) < best_end):
                best, best_end = stop, at + len(stop)
        return best

    def _cut_at_stop(self, row: _Row, stop: str) -> str:
        """Final text: the full decode cut before the stop string (vLLM excludes it)."""
        full = self._decode(row.token_ids)
        best_at, best_end = -1, None
        for s in row.req.spec.stop:
            at = full.find(s)
            if at >= 0 and (best_end is None or at + len(s) < best_end):
                best_at, best_end = at, at + len(s)
        if best_at >= 0:
            return full[:best_at]
        # The full and incremental decodes disagree (rare tokenizer quirk): use the latter.
        return row.text[: row.text.rfind(stop)]
