"""Calls into the broadcast transport's worker engine through vLLM's weight-transfer API.

Each action (`transfer_wire`) runs as one session of vLLM's own lifecycle:
`start_weight_update`, `update_weights(action)`, `finish_weight_update`. vLLM's worker refuses
a session while another is open, and ends one by itself when `update_weights` raises there
(then there is no `finish` to call); a session left open otherwise is closed before the next
starts. Callers serialize sessions (`ServedWeights.lock`).

vLLM hands only an error's message across its processes, wrapped in its own words; `failure`
unwraps it and tells a misfit (`WeightsError`) from any other failure (`RuntimeError`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..base import WeightsError
from .transfer_wire import REFUSED, Discard, Forget, Load, Receive, Restore

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

# vLLM's wrappers around a worker's message: the engine core's, then the executor's.
_WRAPPERS = (
    re.compile(r"^Call to \w+ method failed: (?P<inner>.*)$", re.DOTALL),
    re.compile(
        r"^Worker failed with error '(?P<inner>.*)', please check the stack trace above "
        r"for the root cause$",
        re.DOTALL,
    ),
)


def worker_message(exc: BaseException) -> str:
    """The worker's own message inside vLLM's wrappers (the text itself when not wrapped)."""
    message = str(exc).strip()
    for wrapper in _WRAPPERS:
        match = wrapper.match(message)
        if match:
            message = match.group("inner").strip()
    return message


def failure(exc: BaseException) -> Exception:
    """`WeightsError` for a refusal of the worker's checks, `RuntimeError` otherwise."""
    message = worker_message(exc)
    if message.startswith(REFUSED):
        return WeightsError(message.removeprefix(REFUSED))
    return RuntimeError(message)


async def run_action(llm: AsyncLLM, action: Receive | Load | Restore | Discard | Forget) -> None:
    """One action in a session of its own; raises `failure(...)` of what went wrong."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    request = WeightTransferUpdateRequest(update_info=action.model_dump(mode="json"))
    try:
        await _start(llm)
        await llm.update_weights(request)
        await llm.finish_weight_update()
    except Exception as exc:
        raise failure(exc) from exc


async def _start(llm: AsyncLLM) -> None:
    try:
        await llm.start_weight_update()
    except Exception as exc:
        if "already active" not in str(exc):
            raise
        # A session left open by a call that failed before vLLM's worker ran it (or was cut
        # off): nothing was loaded in it, so close it and start afresh.
        await llm.finish_weight_update()
        await llm.start_weight_update()
