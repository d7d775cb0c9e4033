"""The vllm engine's kind gate (`services.engine.vllm.requests.KindGate`), without an engine:
requests that conflict inside one vLLM batch never overlap, and none starves.

It needs no engine, but is marked `vllm` (and skipped without vllm) like the vllm engine's
other tests (tests/test_engine_vllm.py), so `-m vllm` selects the backend's tests together.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.backends import needs_vllm

pytestmark = [pytest.mark.vllm, needs_vllm]


def test_kind_gate_keeps_conflicting_kinds_apart():
    from services.engine.vllm.requests import KindGate as _KindGate

    async def scenario() -> list[tuple[str, str]]:
        gate = _KindGate()
        log: list[tuple[str, str]] = []
        active: dict[str, int] = {"token_ids": 0, "top_k": 0, "plain": 0}

        async def job(kind: str, name: str, hold: float) -> None:
            async with gate.hold(kind):
                active[kind] += 1
                other = {"token_ids": "top_k", "top_k": "token_ids"}.get(kind)
                assert other is None or active[other] == 0, "conflicting kinds overlapped"
                log.append(("in", name))
                await asyncio.sleep(hold)
                active[kind] -= 1

        first = asyncio.ensure_future(job("top_k", "k1", 0.05))
        await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(job("token_ids", "t1", 0.01))
        plain = asyncio.ensure_future(job("plain", "p", 0.0))
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(job("top_k", "k2", 0.01))  # queues behind t1
        # A cancelled waiter must not wedge the gate.
        doomed = asyncio.ensure_future(job("token_ids", "t-cancelled", 0.0))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(first, waiter, plain, late, return_exceptions=False)
        async with asyncio.timeout(1):
            await job("token_ids", "t2", 0.0)
        return log

    order = [name for _, name in asyncio.run(scenario())]
    assert order.index("p") < order.index("t1")  # plain never waits
    assert order.index("k1") < order.index("t1") < order.index("k2")  # no starvation
    assert order[-1] == "t2" and "t-cancelled" not in order
