"""`opd demo`'s orchestration on the tiny fixture models (hf backend, a couple of steps).

The demo's own models (SmolLM2 from the GGUF) are covered by test_demo_models.py; here the
point is the wiring: services started and stopped, the trainer's evaluations turned into the
before/after table, the teacher's row, plots, and a clean stop on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from opd.demo import DEFAULT_RUN_DIR, split_run_dir
from opd.demo import main as demo_main
from trainer.data import load_gsm8k

REPO_ROOT = Path(__file__).resolve().parent.parent

SMALL = [
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_tokens=16",
    "rollout.prompts_per_request=2",
    "eval.max_tokens=16",
    "eval.kl_prompts=2",
    "eval.kl_samples_per_prompt=1",
    "logging.progress_bar=false",
]


def _demo_args(tiny_models: dict[str, Path], gsm8k_dir: Path, run_dir: Path) -> list[str]:
    return [
        *_model_args(tiny_models),
        "--data", str(gsm8k_dir),
        "--run-dir", str(run_dir),
    ]


def _model_args(tiny_models: dict[str, Path]) -> list[str]:
    return [
        "--backend", "hf",
        "--teacher", str(tiny_models["teacher"]),
        "--student", str(tiny_models["student"]),
        "--heldout", "4",
    ]


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) != 0


def _service_urls(text: str) -> list[str]:
    return re.findall(r"(?:teacher|rollout) ready at (http://127\.0\.0\.1:\d+)", text)


def test_demo_runs_and_prints_the_table(
    tiny_models, gsm8k_dir, tmp_path, capsys, caplog, monkeypatch
) -> None:
    caplog.set_level(logging.INFO, logger="opd")  # opd.demo and opd.launch
    # Offline and on its own: the demo config's `bundled` data wins over the environment,
    # and a run_dir= override moves the whole run, the table included.
    monkeypatch.setenv("OPD_DATA_DIR", str(tmp_path / "no-such-data"))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "x"
    args = [*_model_args(tiny_models), f"run_dir={run_dir}", "trainer.total_steps=2", *SMALL]
    assert demo_main(args) == 0
    assert not (tmp_path / "runs").exists()  # nothing went to the default runs/demo

    out = capsys.readouterr().out
    table = (run_dir / "results.md").read_text()
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert {"teacher", "student before", "student after"} <= set(rows)
    assert "0 (reference)" in rows["teacher"]
    kl = [float(rows[name].split()[2]) for name in ("student before", "student after")]
    assert all(k > 0 for k in kl)  # the tiny student is a different random model
    assert "first 4 GSM8K test problems" in table and "reverse KL on the first 2" in table
    assert "reverse KL to the teacher fell by" in out
    assert "greedy answers to the first held-out problem" in table
    answers = [json.loads(line) for line in (run_dir / "train" / "eval_samples.jsonl").open()]
    assert sorted({a["step"] for a in answers}) == [0, 2] and len(answers) == 8
    assert {"response", "correct", "formatted", "has_answer", "ground_truth"} <= set(answers[0])
    # The held-out problems are the first rows of the bundled test split.
    bundled = load_gsm8k("test", gsm8k_dir, limit=4)
    assert [(a["index"], a["ground_truth"]) for a in answers[:4]] == [
        (ex.index, ex.ground_truth) for ex in bundled
    ]

    train_dir = run_dir / "train"
    assert (train_dir / "metrics.jsonl").is_file()
    assert {p.name for p in (train_dir / "plots").glob("*.png")} >= {"kl.png", "timing.png"}
    # Both services were stopped when the demo ended.
    urls = _service_urls(caplog.text)
    assert len(urls) == 2 and all(_port_closed(u) for u in urls)


def test_run_dir_override_is_the_demo_run_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_run_dir(None, ["trainer.lr=1e-4"]) == (
        (tmp_path / DEFAULT_RUN_DIR).resolve(), ["trainer.lr=1e-4"]
    )
    assert split_run_dir("flag", ["run_dir=runs/x", "eval.limit=4"]) == (
        (tmp_path / "runs" / "x").resolve(), ["eval.limit=4"]
    )
    assert split_run_dir("flag", [])[0] == (tmp_path / "flag").resolve()


def test_empty_run_dir_override_is_refused(capsys) -> None:
    assert demo_main(["run_dir="]) == 2
    assert "run_dir=" in capsys.readouterr().err


def test_demo_needs_both_models(capsys) -> None:
    assert demo_main(["--teacher", "x"]) == 2
    assert "--teacher and --student go together" in capsys.readouterr().err


def test_demo_without_data_says_where_to_put_it(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OPD_DATA_DIR", raising=False)
    assert demo_main(["--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path)]) == 2
    assert "no GSM8K data found" in capsys.readouterr().err


def test_ctrl_c_stops_the_services(tiny_models, gsm8k_dir, tmp_path) -> None:
    run_dir = tmp_path / "demo"
    args = _demo_args(tiny_models, gsm8k_dir, run_dir) + ["trainer.total_steps=1000", *SMALL]
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd.cli", "demo", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 240
        while "training (hf backend)" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the demo never started training"
            time.sleep(0.5)
        time.sleep(3)  # inside the trainer's loop
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text(errors="replace")
    assert rc == 130 and "interrupted; services stopped" in text, text[-3000:]
    urls = _service_urls(text)
    assert len(urls) == 2 and all(_port_closed(u) for u in urls), text[-3000:]
