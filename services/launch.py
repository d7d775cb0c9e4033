"""Run a service as a local subprocess: free port, log file, wait for ``/ready``, stop.

The one launcher behind ``opd demo`` (teacher and rollout), ``opd eval`` on a checkpoint (a
temporary rollout service) and the HTTP tests::

    from services.launch import running_service

    with running_service("services.teacher", ["--model", path], ready_timeout_s=300) as svc:
        httpx.get(svc.base_url + "/info")

- ``target`` is a module (run as ``python -m target`` with this interpreter) or a full
  command. The port is free when picked and handed over as ``--host H --port N`` (appended)
  and as ``OPD_HOST`` / ``OPD_PORT``; a command that takes the port another way puts the
  placeholder ``{port}`` in its arguments instead (then nothing is appended).
- The child runs in its own process group: a Ctrl-C in the terminal reaches the parent only
  (which then stops the service in order), and stopping signals the whole group, so engine
  worker processes go too.
- Output goes to a log file, never a pipe (a chatty service cannot block on a full pipe);
  a failure to start raises :class:`ServiceStartError` (or :class:`TimeoutError`) with the
  log's tail, after stopping the service.
- Ready means ``GET /ready`` answers 200. The process dying, or ``/ready`` reporting a
  failed load (the services stay up after one, to say why), ends the wait at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

__all__ = [
    "ServiceProcess",
    "ServiceStartError",
    "free_port",
    "running_service",
    "start_service",
    "wait_all_ready",
]

log = logging.getLogger("opd.launch")

#: The directory holding the ``services`` package: put on the child's ``PYTHONPATH`` so it
#: imports the same code as the parent, whatever its working directory.
_IMPORT_ROOT = Path(__file__).resolve().parent.parent
#: ``/ready`` states after which waiting longer cannot help.
_TERMINAL_STATES = frozenset({"failed", "broken"})
_LOG_TAIL_CHARS = 20000


class ServiceStartError(RuntimeError):
    """The service cannot become ready: it exited, or ``/ready`` reported a failed load.

    (Waiting too long raises :class:`TimeoutError`, also with the log's tail.)
    """


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """A started service: its ``base_url``, the process, its log file.

    ``stop`` sends ``stop_signal`` to the process group, then SIGKILL after
    ``stop_timeout`` seconds. The log file is removed on stop unless ``keep_log``.
    """

    name: str
    base_url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    command: list[str] = field(default_factory=list)
    ready_path: str = "/ready"
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 30.0
    keep_log: bool = True

    def logs(self, tail: int = _LOG_TAIL_CHARS) -> str:
        """The last ``tail`` characters of the service's stdout and stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def _fail(self, what: str, exc_type: type[Exception] = ServiceStartError) -> Exception:
        """Stop the service and build the error to raise, with the log's tail in it."""
        tail = self.logs()
        self.stop()
        return exc_type(
            f"{self.name} {what}: {' '.join(self.command)}\n--- log ({self.log_path}) ---\n{tail}"
        )

    def poll_ready(self) -> bool:
        """One look: True when ready, False while loading; raises if it cannot get ready."""
        if self.proc.poll() is not None:
            raise self._fail(f"exited with code {self.proc.returncode} before it was ready")
        try:
            response = httpx.get(self.base_url + self.ready_path, timeout=2.0)
        except httpx.HTTPError:
            return False  # not listening yet
        if response.status_code == 200:
            return True
        with contextlib.suppress(ValueError, AttributeError):
            if response.json().get("status") in _TERMINAL_STATES:
                detail = json.dumps(response.json())[:1000]
                raise self._fail(f"failed to load ({response.status_code} {detail})")
        return False

    def wait_ready(self, timeout_s: float = 120.0) -> ServiceProcess:
        """Block until ready; on failure stop the service and raise with the log's tail.

        Raises:
            ServiceStartError: the process exited or ``/ready`` reported a failed load.
            TimeoutError: not ready after ``timeout_s`` seconds.
        """
        wait_all_ready([self], timeout_s)
        return self

    def stop(self) -> int | None:
        """Stop the process group (``stop_signal``, then SIGKILL); the exit code. Idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                sig = signal.Signals(self.stop_signal).name
                log.warning("%s ignored %s for %.0fs; killing it", self.name, sig, self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self.keep_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return self.proc.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_all_ready(services: Sequence[ServiceProcess], timeout_s: float) -> None:
    """Wait for several services loading in parallel; the first failure stops all of them.

    Raises:
        ServiceStartError: one exited or failed to load.
        TimeoutError: some were not ready after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(services)
    try:
        while pending:
            for svc in list(pending):
                if svc.poll_ready():
                    log.info("%s ready at %s", svc.name, svc.base_url)
                    pending.remove(svc)
            if pending and time.monotonic() > deadline:
                raise pending[0]._fail(f"not ready after {timeout_s:.0f}s", TimeoutError)
            if pending:
                time.sleep(0.2)
    except BaseException:
        for svc in services:
            svc.stop()
        raise


def _command(target: str | Sequence[str], args: Sequence[str], host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", target] if isinstance(target, str) else list(target)
    cmd += list(args)
    if any("{port}" in part for part in cmd):
        return [part.replace("{port}", str(port)) for part in cmd]
    return cmd + ["--host", host, "--port", str(port)]


def start_service(
    target: str | Sequence[str],
    args: Sequence[str] = (),
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_path: str | Path | None = None,
    keep_log: bool | None = None,
    cwd: str | Path | None = None,
    stop_signal: int = signal.SIGTERM,
    stop_timeout: float = 30.0,
    wait: bool = True,
    ready_timeout_s: float = 120.0,
    ready_path: str = "/ready",
) -> ServiceProcess:
    """Start ``target`` on a free port (see the module doc); wait until ready unless ``wait``
    is false (start several, then :func:`wait_all_ready`: they load in parallel).

    ``log_path`` None writes to a temporary file; ``keep_log`` (default: whether a
    ``log_path`` was given) decides whether the log outlives :meth:`ServiceProcess.stop`.
    ``env`` is added to this process's environment.
    """
    port = port or free_port(host)
    cmd = _command(target, args, host, port)
    name = name or (target if isinstance(target, str) else Path(cmd[0]).name)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_IMPORT_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.update({"OPD_HOST": host, "OPD_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    if keep_log is None:
        keep_log = log_path is not None
    if log_path is None:
        fd, tmp_name = tempfile.mkstemp(prefix=f"opd-{Path(name).name}-", suffix=".log")
        os.close(fd)
        log_path = tmp_name
    log_path = Path(log_path)
    log.info("starting %s: %s (log: %s)", name, " ".join(cmd), log_path)
    with open(log_path, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
        )
    service = ServiceProcess(
        name=name,
        base_url=f"http://{host}:{port}",
        port=port,
        proc=proc,
        log_path=log_path,
        command=cmd,
        ready_path=ready_path,
        stop_signal=stop_signal,
        stop_timeout=stop_timeout,
        keep_log=keep_log,
    )
    return service.wait_ready(ready_timeout_s) if wait else service


@contextlib.contextmanager
def running_service(
    target: str | Sequence[str], args: Sequence[str] = (), **kwargs: object
) -> Iterator[ServiceProcess]:
    """:func:`start_service` (same arguments), ready, for the ``with`` block; always stopped."""
    service = start_service(target, args, **kwargs)  # type: ignore[arg-type]
    try:
        yield service
    finally:
        service.stop()
