"""Scoring in the hf backend: packing queued sequences into batches, and the batch forward.

Every queued sequence (from any number of requests) is sorted by length and packed into
right-padded batches of at most `max_batch_tokens` padded tokens (a longer sequence runs
alone); one forward per batch. Memory is bounded by `max_batch_tokens x vocab` logits (model
dtype) plus a bounded float32 chunk. With prefix sharing on (the default), sequences that
share a prefix are scored through `prefix` instead: the shared prefix runs once and the rest
continue from its KV cache; this module's per-position math (`sequence_result`) is the same
for both paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from ..base import ScoreInput, ScoreResult
from .model import ModelRunner

# Positions whose float32 log-softmax is materialised at once: bounds the extra memory to
# ~512 MiB whatever the vocabulary (151k for Qwen -> ~880 positions per chunk).
_SCORE_CHUNK_ELEMS = 1 << 27

_Item = TypeVar("_Item")


def pack_batches(
    items: Sequence[_Item], length: Callable[[_Item], int], max_batch_tokens: int
) -> list[list[_Item]]:
    """Sort by length and cut into batches of <= `max_batch_tokens` padded tokens."""
    ordered = sorted(items, key=length)
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    for item in ordered:
        n = length(item)
        # ascending order: the new item is the longest, so the batch pads to n
        if current and (len(current) + 1) * n > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


def sequence_result(rows: torch.Tensor, targets: torch.Tensor, inp: ScoreInput) -> ScoreResult:
    """The `ScoreResult` of one sequence from the logits `rows` ([n, vocab], row i predicting
    `targets[i]`): float32 log-softmax of `rows / T`, in bounded chunks."""
    count, vocab = rows.shape
    device = rows.device
    chunk = max(1, _SCORE_CHUNK_ELEMS // vocab)
    token_lp = torch.empty(count, dtype=torch.float32, device=device)
    top_ids = torch.empty((count, inp.top_k), dtype=torch.long, device=device)
    top_lp = torch.empty((count, inp.top_k), dtype=torch.float32, device=device)
    for c0 in range(0, count, chunk):
        c1 = min(count, c0 + chunk)
        lp = torch.log_softmax(rows[c0:c1].float() / inp.temperature, dim=-1)
        token_lp[c0:c1] = lp.gather(1, targets[c0:c1].unsqueeze(1)).squeeze(1)
        if inp.top_k > 0:
            vals, idx = torch.topk(lp, inp.top_k, dim=-1)
            top_lp[c0:c1] = vals
            top_ids[c0:c1] = idx
    return ScoreResult(
        logprobs=token_lp.cpu().numpy().astype(np.float32),
        top_token_ids=top_ids.cpu().numpy().astype(np.int32) if inp.top_k > 0 else None,
        top_logprobs=top_lp.cpu().numpy().astype(np.float32) if inp.top_k > 0 else None,
    )


def score_batch(
    runner: ModelRunner,
    inputs: list[ScoreInput],
    observer: Callable[[str, int], None] | None = None,
) -> list[ScoreResult]:
    """Right-padded batch forward; float32 log-softmax of `logits / T` per sequence.

    Blocking (run it in a worker thread); holds the runner's lock for the forward.
    """
    with runner.lock, torch.inference_mode():
        runner.check_alive()
        return score_padded(runner, inputs, observer)


def score_padded(
    runner: ModelRunner,
    inputs: list[ScoreInput],
    observer: Callable[[str, int], None] | None = None,
) -> list[ScoreResult]:
    """`score_batch`'s body: the caller holds the runner's lock under inference mode."""
    device = runner.device
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
    logits, _ = runner.forward(ids, mask, positions, None, keep)
    offset = width - keep
    if observer is not None:
        observer("score", len(inputs))
    results: list[ScoreResult] = []
    for i, inp in enumerate(inputs):
        first, last = inp.start - 1, lengths[i] - 1  # predicting positions [first, last)
        rows = logits[i, first - offset : last - offset]
        results.append(sequence_result(rows, ids[i, first + 1 : last + 1], inp))
    return results
