"""An event loop running in a daemon thread, for tests that drive vLLM's AsyncLLM engine.

AsyncLLM binds to the event loop it first runs on and pytest-asyncio is not used, so a test
module owns one `LoopThread` and submits every engine call to it (tests/test_engine_vllm.py,
tests/test_prefix_scoring.py). The hf engine's tests drive theirs with `run_until_complete`
instead (tests/engine_hf.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class LoopThread:
    """An event loop running in a daemon thread; `run` submits a coroutine and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 300.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()
