"""The teacher servers of tests/test_teacher_http.py (hf) and tests/test_teacher_vllm.py
(vllm): their command line and limits, and the ONE vLLM teacher.

vLLM starts slowly (three processes importing vllm). When the vllm tests run after the hf
ones, `hf_servers` starts the vLLM teacher loading in the background with
`start_vllm_early`, so its start overlaps the hf tests instead of following them, and
`vllm_teacher` takes it over with `vllm_started_early` (and stops it after its module).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.backends import VLLMServer
from tests.servers import ServerHandle, start_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny-teacher"
MAX_MODEL_LEN = 128
MAX_TOP_K = 8
MAX_N = 4
MAX_BODY = 200_000


def _server_args(model: Path, backend: str, *extra: str) -> list[str]:
    return ["--model", str(model), "--backend", backend, "--dtype", "float32",
            "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN),
            "--max-top-k", str(MAX_TOP_K), "--max-n", str(MAX_N),
            "--max-body-bytes", str(MAX_BODY), "--no-access-log", "--log-level", "warning",
            *extra]


def _vllm_available() -> bool:
    # find_spec, not import: importing vllm here would cost the test process seconds.
    return (importlib.util.find_spec("vllm") is not None
            and importlib.util.find_spec("services.engine.vllm") is not None)


def _start_vllm(tiny_models) -> ServerHandle:
    """The vLLM (CPU build here) teacher: eager, float32, 1 GiB of KV cache."""
    args = _server_args(tiny_models["teacher"], "vllm", "--enforce-eager")
    env = {**VLLMServer.SERVER_ENV, "OPD_API_KEY": KEY}
    return start_server("services.teacher", args, env=env, wait=False)


_EARLY_VLLM = pytest.StashKey[ServerHandle]()


def vllm_tests_follow(request: pytest.FixtureRequest) -> bool:
    """Whether a selected test after the requesting module's tests uses `vllm_teacher`."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    later = items[mine[-1] + 1 :]
    return any("vllm_teacher" in getattr(item, "fixturenames", ()) for item in later)


def start_vllm_early(config: pytest.Config, tiny_models) -> None:
    """Start the vLLM teacher loading now, for `vllm_started_early` to hand over later."""
    srv = _start_vllm(tiny_models)
    config.stash[_EARLY_VLLM] = srv
    # Stopped by whoever takes it over; this covers a session that ends before (-x, Ctrl-C).
    config.add_cleanup(srv.stop)


def vllm_started_early(config: pytest.Config) -> ServerHandle | None:
    """The vLLM teacher `start_vllm_early` started, if any; handed over once."""
    srv = config.stash.get(_EARLY_VLLM, None)
    if srv is not None:
        del config.stash[_EARLY_VLLM]
    return srv
