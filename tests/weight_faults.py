"""`python -m tests.weight_faults ARGS`: the rollout service with one injected fault.

A checkpoint whose safetensors metadata holds `opd_test_fault` passes every check (names,
shapes, dtypes) but fails *inside the engine* while being applied, the way a device error or
a file changed under the reader would: the hf backend's copy stops half-way, vLLM's
`reload_weights` raises. On the vllm backend, so does loading a broadcast whose version is
listed in `OPD_TEST_FAULT_VERSIONS` (comma-separated): its `load` call into vLLM's
weight-transfer engine raises before reaching the worker (leaving vLLM's update session
open, as a call cut off on its way would). Nothing else differs from
`python -m services.student_rollout`, so tests see what the real service does after such a
failure (tests/test_weights_restore.py, tests/test_broadcast_sync.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

FAULT_KEY = "opd_test_fault"
FAULT_VERSIONS_ENV = "OPD_TEST_FAULT_VERSIONS"


def is_marked(directory: str | Path) -> bool:
    """Whether any safetensors file in `directory` carries the fault marker."""
    from safetensors import safe_open

    for file in Path(directory).glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as f:
            if FAULT_KEY in (f.metadata() or {}):
                return True
    return False


def _install_hf() -> None:
    from services.engine.hf.weights import ModelWeights

    swap = ModelWeights.swap

    def faulty_swap(self: ModelWeights, tensors: dict[str, Any], source: str | Path) -> None:
        if not is_marked(source):
            return swap(self, tensors, source)
        copy = type(self)._copy
        calls = {"n": 0}

        def half_then_fail(selected: dict[str, Any]) -> None:
            calls["n"] += 1
            if calls["n"] > 1:  # the restore copy
                return copy(self, selected)
            names = sorted(selected)
            copy(self, {n: selected[n] for n in names[: len(names) // 2]})
            raise RuntimeError("injected fault: the copy stopped half-way")

        self._copy = half_then_fail  # type: ignore[method-assign]
        try:
            return swap(self, tensors, source)
        finally:
            del self._copy

    ModelWeights.swap = faulty_swap  # type: ignore[method-assign]


def _install_vllm() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    rpc = AsyncLLM.collective_rpc

    async def faulty_rpc(self: AsyncLLM, method: Any, *args: Any, **kwargs: Any) -> Any:
        path = (kwargs.get("kwargs") or {}).get("weights_path")
        if method == "reload_weights" and path and is_marked(path):
            raise RuntimeError("injected fault: vLLM failed while reloading")
        return await rpc(self, method, *args, **kwargs)

    AsyncLLM.collective_rpc = faulty_rpc  # type: ignore[method-assign]

    update = AsyncLLM.update_weights
    versions = {int(v) for v in os.environ.get(FAULT_VERSIONS_ENV, "").split(",") if v.strip()}
    received: dict[str, int] = {}

    async def faulty_update(self: AsyncLLM, request: Any) -> None:
        info = request.update_info if isinstance(request.update_info, dict) else {}
        if info.get("action") == "receive":
            received["version"] = info["request"]["version"]
        elif info.get("action") == "load" and received.get("version") in versions:
            raise RuntimeError("injected fault: vLLM failed while loading the broadcast")
        return await update(self, request)

    AsyncLLM.update_weights = faulty_update  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    """Install the fault for the chosen backend, then run the rollout service."""
    from services.student_rollout.__main__ import main as serve

    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "hf"
    _install_vllm() if backend == "vllm" else _install_hf()
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
