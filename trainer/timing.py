"""Named timing spans: ``with timed("train", metrics): ...`` records ``timing/train_s``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["timed"]


@contextmanager
def timed(name: str, metrics: dict[str, float]) -> Iterator[None]:
    """Store the wall time of the block, in seconds, as ``metrics[f"timing/{name}_s"]``."""
    start = time.monotonic()
    try:
        yield
    finally:
        metrics[f"timing/{name}_s"] = time.monotonic() - start
