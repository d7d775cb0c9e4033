"""Where a stop string cuts a completion's text (vLLM's convention, shared by both backends)."""

from __future__ import annotations

from collections.abc import Sequence


def text_before_stop(text: str, stops: Sequence[str]) -> str | None:
    """`text` cut before the stop string that completes earliest (ties: list order).

    The stop string itself is excluded, as vLLM does. None when no stop string occurs (the
    caller's incremental detokenization then disagrees with this full decode, a rare tokenizer
    quirk, and it falls back on its own text).
    """
    best_at, best_end = -1, None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (best_end is None or at + len(stop) < best_end):
            best_at, best_end = at, at + len(stop)
    return text[:best_at] if best_at >= 0 else None
