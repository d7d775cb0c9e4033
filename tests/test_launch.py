"""The service launcher (services/launch.py): start, wait for /ready, fail loudly, stop."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from services.launch import (
    ServiceStartError,
    free_port,
    running_service,
    start_service,
    wait_all_ready,
)

# A stand-in service: `python fake.py PORT MODE`. Modes: ready (200 on /ready), failed (503
# with status "failed", as our services answer after a failed load), exit (dies at once),
# stubborn (ready, but ignores SIGTERM), loading (never ready).
FAKE_SERVICE = r'''
import json, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
print(f"fake service pid={os.getpid()} mode={mode} env={os.environ.get('FAKE_ENV')}", flush=True)
if mode == "exit":
    print("boom: the model could not be loaded", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        status = {"ready": "ready", "stubborn": "ready", "failed": "failed"}.get(mode, "loading")
        body = json.dumps({"status": status}).encode()
        self.send_response(200 if status == "ready" else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake(tmp_path: Path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SERVICE)

    def command(mode: str) -> list[str]:
        return [sys.executable, str(script), "{port}", mode]

    return command


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_starts_waits_and_stops(fake, tmp_path: Path) -> None:
    log_path = tmp_path / "svc.log"
    svc = start_service(
        fake("ready"), name="fake", env={"FAKE_ENV": "seen"}, log_path=log_path,
        ready_timeout_s=30,
    )
    assert svc.alive()
    assert httpx.get(svc.base_url + "/ready").json() == {"status": "ready"}
    assert svc.base_url == f"http://127.0.0.1:{svc.port}"
    assert str(svc.port) in svc.command  # the {port} placeholder was filled in
    assert "env=seen" in svc.logs()
    assert svc.stop() == -signal.SIGTERM
    assert not svc.alive() and svc.stop() == -signal.SIGTERM  # idempotent
    assert log_path.is_file()  # a log path that was given is kept


def test_temporary_log_is_removed_unless_kept(fake) -> None:
    with running_service(fake("ready"), ready_timeout_s=30) as svc:
        log_path = svc.log_path
        assert log_path.is_file()
    assert not svc.alive() and not log_path.exists()
    with running_service(fake("ready"), keep_log=True, ready_timeout_s=30) as svc:
        pass
    assert svc.log_path.is_file()
    svc.log_path.unlink()


def test_context_manager_stops_on_error(fake) -> None:
    with pytest.raises(KeyError), running_service(fake("ready"), ready_timeout_s=30) as svc:
        raise KeyError("boom")
    assert not svc.alive()


def test_early_exit_raises_with_the_log_tail(fake) -> None:
    with pytest.raises(ServiceStartError) as info:
        start_service(fake("exit"), name="teacher", ready_timeout_s=30)
    message = str(info.value)
    assert "teacher exited with code 3" in message
    assert "boom: the model could not be loaded" in message


def test_failed_load_ends_the_wait_at_once(fake) -> None:
    with pytest.raises(ServiceStartError, match="failed to load") as info:
        start_service(fake("failed"), ready_timeout_s=120)
    assert "mode=failed" in str(info.value)


def test_timeout_stops_the_service(fake) -> None:
    svc = start_service(fake("loading"), wait=False)
    with pytest.raises(TimeoutError, match="not ready after 1s"):
        svc.wait_ready(1.0)
    assert not svc.alive()


def test_sigkill_when_the_stop_signal_is_ignored(fake) -> None:
    svc = start_service(fake("stubborn"), stop_timeout=1.0, ready_timeout_s=30)
    assert svc.stop() == -signal.SIGKILL


def test_wait_all_ready_stops_every_service_on_a_failure(fake) -> None:
    good = start_service(fake("ready"), name="good", wait=False)
    bad = start_service(fake("exit"), name="bad", wait=False)
    with pytest.raises(ServiceStartError, match="bad exited"):
        wait_all_ready([good, bad], timeout_s=30)
    assert not good.alive() and not bad.alive()


def test_a_real_service_starts_and_stops_with_its_process_group(tiny_models) -> None:
    args = ["--model", str(tiny_models["teacher"]), "--backend", "hf", "--dtype", "float32"]
    with running_service("services.teacher", args, name="teacher", ready_timeout_s=180) as svc:
        info = httpx.get(svc.base_url + "/ready", timeout=10).json()
        assert info["status"] == "ready"
        pid = svc.proc.pid
    assert svc.proc.returncode is not None
    assert _gone(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the group is left


def test_opd_eval_temporary_rollout_service(tiny_models) -> None:
    """`opd eval` on a checkpoint: a rollout service started on it, answering, then gone."""
    from trainer.eval import temporary_rollout_service

    with temporary_rollout_service(str(tiny_models["student"]), ready_timeout_s=180) as rollout:
        url = rollout.base_url
        resp = rollout.rollouts(
            [{"messages": [{"role": "user", "content": "1+1?"}]}],
            n=1, max_tokens=4, temperature=0.0, seed=0,
        )
        assert len(resp.data) == 1
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2.0)
