"""Start a real service process (uvicorn in a subprocess) for HTTP tests, and stop it.

```python
from tests.servers import start_server

with start_server("services.teacher", args=["--model", str(path)], env={"OPD_API_KEY": "k"}) as srv:
    httpx.get(srv.base_url + "/info", headers={"Authorization": "Bearer k"})
```

A thin layer over :mod:`services.launch` (the launcher `opd demo` and `opd eval` use), with
the tests' defaults: the child runs from the repository root, stops with SIGINT (uvicorn's
graceful shutdown: lifespan exit, engine shutdown) and logs to a temporary file that is
removed when it stops (`keep_log=True` keeps it; read `handle.logs()` before stopping).

- `target`: a module name (run as `python -m target`) or a full command list.
- The port is free when picked and handed over as `--host 127.0.0.1 --port N` (appended to
  the command) and as `OPD_HOST` / `OPD_PORT`; a command that takes the port another way can
  put the placeholder `{port}` in its arguments instead (then nothing is appended).
- `start_server` waits until `GET ready_path` answers 200 (or the process dies, or reports a
  failed model load, or `ready_timeout` passes: then it raises with the server's log tail).

The `server_factory` fixture starts any number of servers in a test and stops them after it.
To make it visible to every test, import it in tests/conftest.py
(`from tests.servers import server_factory  # noqa: F401`); importing it into a test module
instead trips ruff's F811 where the test takes it as an argument. For a server shared by a
module, call `start_server` from a module-scoped fixture (see tests/test_teacher_http.py).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping, Sequence

import pytest

from services.launch import ServiceProcess, free_port, start_service
from tests.scripts import REPO_ROOT

__all__ = ["ServerHandle", "free_port", "server_factory", "start_server"]

#: What the tests call a running server: the launcher's handle (``base_url``, ``proc``,
#: ``port``, ``logs()``, ``wait_ready()``, ``alive()``, ``stop()``).
ServerHandle = ServiceProcess


def start_server(
    target: str | Sequence[str],
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 120.0,
    ready_path: str = "/ready",
    port: int | None = None,
    stop_timeout: float = 30.0,
    wait: bool = True,
    keep_log: bool = False,
) -> ServerHandle:
    """Start `target` on a free port and wait until `ready_path` answers 200 (see module doc).

    `wait=False` returns at once: start several servers, then `handle.wait_ready()` each (they
    load in parallel).
    """
    # Named like start_service's own keywords because it forwards them (ServiceProcess too).
    handle = start_service(
        target,
        args,
        port=port,
        env={"TOKENIZERS_PARALLELISM": "false", **(env or {})},
        cwd=REPO_ROOT,
        stop_signal=signal.SIGINT,
        stop_timeout=stop_timeout,
        ready_path=ready_path,
        keep_log=keep_log,
        wait=False,
    )
    return handle.wait_ready(ready_timeout) if wait else handle


@pytest.fixture
def server_factory() -> Iterator[object]:
    """`server_factory(target, args, env=..., ...)` -> ServerHandle; all stopped after the test."""
    handles: list[ServerHandle] = []

    def factory(target: str | Sequence[str], args: Sequence[str] = (),
                **kwargs: object) -> ServerHandle:
        handle = start_server(target, args, **kwargs)  # type: ignore[arg-type]
        handles.append(handle)
        return handle

    yield factory
    for handle in handles:
        handle.stop()
