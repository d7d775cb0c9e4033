"""Request checks both engine backends apply before any model work.

The wire models rule out most bad input; these checks cover what only the engine knows (its
vocabulary, `max_model_len`, the temperatures it supports) and direct callers that bypass the
services. Every refusal is an `EngineRequestError` whose message starts with the field at fault
(`sequences[1].token_ids[2]: ...`, `prompts[0]: ...`), which the services turn into a 400 whose
`param` names that field (`services.common.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import EngineRequestError, SamplingSpec, ScoreInput

TemperatureRange = tuple[float, float]
"""`(low, high)`: the sampling temperatures a backend computes exactly (vLLM: [0.01, 2])."""


def check_token_ids(ids: Sequence[int], vocab_size: int, where: str) -> list[int]:
    """Token ids as Python ints, each inside `[0, vocab_size)`."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return []
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise EngineRequestError(f"{where}.token_ids: expected a list of integer token ids")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise EngineRequestError(
            f"{where}.token_ids[{pos}]: token id {int(arr[pos])} is outside [0, {vocab_size})"
        )
    return [int(t) for t in arr.tolist()]


def _check_temperature(
    temperature: float, where: str, supported: TemperatureRange | None, *, allow_zero: bool
) -> None:
    if allow_zero and temperature == 0:
        return
    if supported is None:
        if temperature < 0 or (not allow_zero and temperature == 0):
            bound = ">= 0" if allow_zero else "> 0"
            raise EngineRequestError(f"{where}: temperature must be {bound}")
        return
    low, high = supported
    # A backend that silently clamps out-of-range temperatures would report the logprobs of
    # another temperature: refuse instead.
    if not low <= temperature <= high:
        raise EngineRequestError(
            f"{where}: temperature {temperature:g} is outside [{low:g}, {high:g}], the range "
            "this engine backend supports" + (" (0 means greedy)" if allow_zero else "")
        )


def check_score_inputs(
    inputs: Sequence[ScoreInput],
    *,
    vocab_size: int,
    max_model_len: int,
    temperatures: TemperatureRange | None = None,
) -> list[list[int]]:
    """Check every score input; returns each one's token ids as Python ints.

    `temperatures`: the range the backend supports besides 1 (None: any T > 0).
    """
    checked = []
    for i, inp in enumerate(inputs):
        where = f"sequences[{i}]"
        ids = check_token_ids(inp.token_ids, vocab_size, where)
        if len(ids) > max_model_len:
            raise EngineRequestError(
                f"{where}: {len(ids)} tokens exceed max_model_len={max_model_len}"
            )
        if not 1 <= inp.start <= len(ids):
            raise EngineRequestError(f"{where}.start={inp.start} must be in [1, {len(ids)}]")
        if not 0 <= inp.top_k <= vocab_size:
            raise EngineRequestError(f"{where}.top_k={inp.top_k} must be in [0, {vocab_size}]")
        if inp.temperature != 1.0:
            _check_temperature(inp.temperature, where, temperatures, allow_zero=False)
        checked.append(ids)
    return checked


def check_generate_request(
    prompts: Sequence[Sequence[int]],
    spec: SamplingSpec,
    *,
    vocab_size: int,
    max_model_len: int,
    temperatures: TemperatureRange | None = None,
) -> list[list[int]]:
    """Check a generate call's sampling parameters and prompts; returns the prompts as ints.

    Every prompt must leave room for at least one generated token within `max_model_len`.
    """
    if spec.n < 1:
        raise EngineRequestError("n must be >= 1")
    if spec.max_tokens < 1:
        raise EngineRequestError("max_tokens must be >= 1")
    _check_temperature(spec.temperature, "temperature", temperatures, allow_zero=True)
    if not 0 < spec.top_p <= 1:
        raise EngineRequestError("top_p must be in (0, 1]")
    if spec.top_k < -1:
        raise EngineRequestError("top_k must be -1 (off), 0 (off) or >= 1")
    if not 0 <= spec.top_logprobs <= vocab_size:
        raise EngineRequestError(f"top_logprobs must be in [0, {vocab_size}]")
    if any(not s for s in spec.stop):
        raise EngineRequestError("stop strings must be non-empty")
    checked = []
    for i, prompt in enumerate(prompts):
        where = f"prompts[{i}]"
        ids = check_token_ids(prompt, vocab_size, where)
        if not ids:
            raise EngineRequestError(f"{where}: empty prompt")
        if len(ids) >= max_model_len:
            raise EngineRequestError(
                f"{where}: {len(ids)} tokens leave no room to generate within "
                f"max_model_len={max_model_len}"
            )
        checked.append(ids)
    return checked
