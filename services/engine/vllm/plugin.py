"""vLLM plugin: registers the broadcast transport's weight-transfer engine in every vLLM process.

vLLM calls the entry points of the `vllm.general_plugins` group in every process it starts
(the API process, the engine core, each worker), so the worker, where vLLM builds the engine,
knows the `opd_broadcast` backend too. The entry point is declared in pyproject.toml; it
takes effect once the project is installed (`scripts/setup.sh`). Registration is lazy (a
module path): nothing is imported until a vLLM engine is started with that backend.
"""

from __future__ import annotations

import logging

from .transfer_wire import BACKEND

logger = logging.getLogger("vllm.opd_broadcast")


def register() -> None:
    """Register `BroadcastWeightTransferEngine` under `BACKEND`; never raises (a failing
    plugin would stop every vLLM process on this host from starting)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

        WeightTransferEngineFactory.register_engine(
            BACKEND, "services.engine.vllm.weight_transfer", "BroadcastWeightTransferEngine"
        )
    except ValueError:
        pass  # registered already: vLLM may load plugins more than once per process
    except Exception:  # noqa: BLE001 - see the docstring
        logger.exception("could not register the %r weight-transfer engine", BACKEND)
