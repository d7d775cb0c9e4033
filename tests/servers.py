"""Start a real service process (uvicorn in a subprocess) for HTTP tests, and stop it.

```python
from tests.servers import start_server

with start_server("services.teacher", args=["--model", str(path)], env={"OPD_API_KEY": "k"}) as srv:
    httpx.get(srv.base_url + "/info", headers={"Authorization": "Bearer k"})
```

- `target`: a module name (run as `python -m target`) or a full command list.
- The port is free when picked and handed over as `--host 127.0.0.1 --port N` (appended to
  the command) and as `OPD_HOST` / `OPD_PORT`; a command that takes the port another way can
  put the placeholder `{port}` in its arguments instead (then nothing is appended).
- `start_server` waits until `GET ready_path` answers 200 (or the process dies, or reports a
  failed model load (our services stay up to say why), or
  `ready_timeout` passes: then it raises with the server's log tail).
- Output goes to a log file (`handle.log_path`, `handle.logs()`), so a chatty server never
  blocks on a full pipe and a failing test can print what the server said; it is removed
  when the server is stopped (`keep_log=True` keeps it).
- Stopping sends SIGINT (uvicorn's graceful shutdown: lifespan exit, engine shutdown), then
  SIGKILL after `stop_timeout`; the whole process group, so engine worker processes go too.

The `server_factory` fixture starts any number of servers in a test and stops them after it.
To make it visible to every test, import it in tests/conftest.py
(`from tests.servers import server_factory  # noqa: F401`); importing it into a test module
instead trips ruff's F811 where the test takes it as an argument. For a server shared by a
module, call `start_server` from a module-scoped fixture (see tests/test_teacher_http.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerHandle:
    """A running server process: `base_url`, the `proc`, and its log file."""

    base_url: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    command: list[str] = field(default_factory=list)
    stop_timeout: float = 30.0

    def logs(self, tail: int = 20000) -> str:
        """The last `tail` characters of the server's stdout+stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    ready_path: str = "/ready"
    keep_log: bool = False

    def wait_ready(self, timeout: float = 120.0) -> ServerHandle:
        """Block until `GET ready_path` is 200; raise (with the log tail) if it dies or hangs."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                logs = self.logs()
                self.stop()  # removes the log
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready: "
                                   f"{' '.join(self.command)}\n--- log ---\n{logs}")
            try:
                response = httpx.get(self.base_url + self.ready_path, timeout=2.0)
                if response.status_code == 200:
                    return self
                last = f"{response.status_code} {response.text[:500]}"
                if '"status":"failed"' in response.text.replace(" ", ""):
                    # Our services stay up after a failed load (to say why): no point waiting.
                    logs = self.logs()
                    self.stop()
                    raise RuntimeError(f"server failed to load: {last}\n"
                                       f"{' '.join(self.command)}\n--- log ---\n{logs}")
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        logs = self.logs()
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s ({last}): "
                           f"{' '.join(self.command)}\n--- log ---\n{logs}")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """Graceful stop (SIGINT to the process group), SIGKILL if it hangs; the exit code.

        The log file is removed (unless `keep_log`): read `logs()` before stopping.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self.keep_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return self.proc.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _command(target: str | Sequence[str], args: Sequence[str], port: int) -> list[str]:
    cmd = [sys.executable, "-m", target] if isinstance(target, str) else list(target)
    cmd += list(args)
    if any("{port}" in part for part in cmd):
        return [part.replace("{port}", str(port)) for part in cmd]
    return cmd + ["--host", "127.0.0.1", "--port", str(port)]


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
    port = port or free_port()
    cmd = _command(target, args, port)
    full_env = dict(os.environ)
    # The child must import this checkout whatever the test's working directory.
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.update({"OPD_HOST": "127.0.0.1", "OPD_PORT": str(port),
                     "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    full_env.update(env or {})
    fd, log_name = tempfile.mkstemp(prefix="opd-server-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                cwd=str(REPO_ROOT), start_new_session=True)
    handle = ServerHandle(base_url=f"http://127.0.0.1:{port}", proc=proc, port=port,
                          log_path=Path(log_name), command=cmd, stop_timeout=stop_timeout,
                          ready_path=ready_path, keep_log=keep_log)
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
