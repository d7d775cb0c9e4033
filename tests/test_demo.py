"""`opd demo`'s orchestration on the tiny fixture models (hf backend, a couple of steps).

The demo's own models (SmolLM2 from the GGUF) are covered by test_demo_models.py; here the
point is the wiring: services started and stopped, the trainer's evaluations turned into the
before/after table and results.json, the teacher's row (asked with its context), the curve
of the evaluations in between, both pairs, and a clean stop on Ctrl-C.
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

import pytest

import trainer.eval as trainer_eval
from opd.demo import DEFAULT_RUN_DIR, PAIR_CONFIGS, native_bf16_cpu, split_run_dir
from opd.demo import main as demo_main
from opd.demo_report import (
    COLUMNS,
    context_label,
    format_table,
    measure_teacher,
    results_json,
    student_rows,
)
from tests.scripts import REPO_ROOT
from trainer.config_sections import TeacherContextConfig
from trainer.data import build_messages, load_gsm8k
from trainer.plots import EVAL_PROGRESS_FILE, eval_progress, plot_eval_progress
from trainer.teacher_context import TeacherContext, split_few_shot

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
#: The context pair on the tiny models: their tokenizer spends ~1,400 tokens on the config's
#: 4 shots, one shot fits their 1,024.
CONTEXT_SMALL = [*SMALL, "teacher.context.few_shot=1"]


def _demo_args(tiny_models: dict[str, Path], gsm8k_dir: Path, run_dir: Path) -> list[str]:
    return [
        *_model_args(tiny_models),
        "--data",
        str(gsm8k_dir),
        "--run-dir",
        str(run_dir),
    ]


def _model_args(tiny_models: dict[str, Path]) -> list[str]:
    return [
        "--backend",
        "hf",
        "--teacher",
        str(tiny_models["teacher"]),
        "--student",
        str(tiny_models["student"]),
        "--heldout",
        "4",
    ]


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) != 0


def _service_urls(text: str) -> list[str]:
    return re.findall(r"(?:teacher|rollout) ready at (http://127\.0\.0\.1:\d+)", text)


MODEL_KEYS = {
    "format_rate",
    "answer_rate",
    "accuracy",
    "reverse_kl",
    "reverse_kl_per_answer",
    "mean_length",
    "degenerate_frac",
    "examples",
}


@pytest.fixture
def teacher_requests(monkeypatch) -> list[list[dict[str, str]]]:
    """The chats the demo sends to the teacher's /v1/chat/completions (its row)."""
    seen: list[list[dict[str, str]]] = []
    real = trainer_eval.chat_completions_generator

    def recording(client, model, **kw):
        generate = real(client, model, **kw)

        def wrapped(messages, max_tokens):
            seen.extend(messages)
            return generate(messages, max_tokens)

        return wrapped

    monkeypatch.setattr(trainer_eval, "chat_completions_generator", recording)
    return seen


def _check_results(results: dict, *, pair: str, steps: int, max_tokens: int) -> None:
    assert results["pair"] == pair
    assert results["heldout"] == 4 and results["kl_prompts"] == 2 and results["steps"] == steps
    assert results["seconds"] > 0
    assert set(results["models"]) == {"teacher", "student_before", "student_after"}
    for name, m in results["models"].items():
        assert set(m) == MODEL_KEYS, name
        for key in ("format_rate", "answer_rate", "accuracy", "degenerate_frac"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert m["format_rate"] <= m["answer_rate"]  # a box is a stated answer
        assert 0.0 <= m["mean_length"] <= max_tokens
        assert len(m["examples"]) == 2 and all(isinstance(e, str) for e in m["examples"])
    models = results["models"]
    assert models["teacher"]["reverse_kl"] == models["teacher"]["reverse_kl_per_answer"] == 0.0
    # The tiny student is a different random model: a positive KL before and after, and per
    # answer at least as large as per token (every answer has a token or more).
    for key in ("student_before", "student_after"):
        kl, per_answer = models[key]["reverse_kl"], models[key]["reverse_kl_per_answer"]
        assert 0 < kl <= per_answer, key


def test_demo_context_pair_runs_and_reports(
    tiny_models, gsm8k_dir, tmp_path, capsys, caplog, monkeypatch, teacher_requests
) -> None:
    caplog.set_level(logging.INFO, logger="opd")  # opd.demo and opd.launch
    # Offline and on its own: the demo config's `bundled` data wins over the environment,
    # and a run_dir= override moves the whole run, the table included.
    monkeypatch.setenv("OPD_DATA_DIR", str(tmp_path / "no-such-data"))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "x"
    args = [
        *_model_args(tiny_models),
        f"run_dir={run_dir}",
        "trainer.total_steps=2",
        *CONTEXT_SMALL,
        "eval.interval=1",
        "eval.interval_limit=2",
    ]
    assert demo_main(args) == 0
    assert not (tmp_path / "runs").exists()  # nothing went to the default runs/demo
    out = capsys.readouterr().out

    results = json.loads((run_dir / "results.json").read_text())
    _check_results(results, pair="context", steps=2, max_tokens=16)
    assert results["teacher_context"] == {
        "system": None,
        "few_shot": 1,
        "reference_solution": False,
    }
    assert results["teacher_name"] == "teacher (1-shot)"

    table = (run_dir / "results.md").read_text()
    assert all(column in table for column in COLUMNS)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert {"teacher (1-shot)", "student before", "student after"} <= set(rows)
    assert "0 (reference)" in rows["teacher (1-shot)"]
    assert "first 4 GSM8K test problems" in table and "reverse KL on the first 2" in table
    assert "problem 2 (answer" in table
    for unit in ("nats/token", "nats/answer"):
        assert re.search(rf"reverse KL to the teacher \({unit}\): (fell|rose) by \d+\.\d{{4}}", out)

    # The teacher's row was asked with its context: the few-shot turn before the question.
    shot = load_gsm8k("train", gsm8k_dir)[0]
    heldout = load_gsm8k("test", gsm8k_dir, limit=4)
    assert len(teacher_requests) == 4
    for chat, ex in zip(teacher_requests, heldout, strict=True):
        assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
        assert shot.question in chat[1]["content"] and ex.question in chat[3]["content"]
        assert re.search(r"\\boxed\{[^}]+\}\.$", chat[2]["content"])

    # Start and end on all 4 problems (the table), step 1 on the first 2 (the curve).
    answers = [json.loads(line) for line in (run_dir / "train" / "eval_samples.jsonl").open()]
    assert [a["step"] for a in answers] == [0] * 4 + [1] * 2 + [2] * 4
    assert {"response", "correct", "formatted", "has_answer", "degenerate"} <= set(answers[0])
    assert [(a["index"], a["ground_truth"]) for a in answers[:4]] == [
        (ex.index, ex.ground_truth) for ex in heldout
    ]
    assert results["models"]["student_after"]["examples"] == [a["response"] for a in answers[6:8]]
    records = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").open()]
    assert [r["eval/num_problems"] for r in records] == [4, 2, 4]
    assert all("eval/answer_rate" in r and "eval/degenerate_frac" in r for r in records)
    assert all("rollout/answer_rate" in r and "rollout/degenerate_frac" in r for r in records[1:])

    # bf16 autocast where the CPU has it natively, float32 elsewhere.
    config = (run_dir / "train" / "config.yaml").read_text()
    autocast = "bfloat16" if native_bf16_cpu() else "null"
    assert re.search(rf"autocast_dtype: {autocast}\b", config)

    plot = run_dir / "train" / "plots" / EVAL_PROGRESS_FILE
    assert plot.stat().st_size > 5000 and str(plot) in out
    # Both services were stopped when the demo ended.
    urls = _service_urls(caplog.text)
    assert len(urls) == 2 and all(_port_closed(u) for u in urls)


def test_one_checkpoint_teacher_row_comes_from_the_rollout_service_before_training(
    tiny_models, gsm8k_dir, tmp_path, caplog, monkeypatch, teacher_requests
) -> None:
    """Context distillation of one checkpoint (the default demo): the rollout service serves
    the teacher's weights until training starts, so the teacher's row is asked there, with
    its context, in batched /v1/rollouts, before the first step; the teacher service only
    scores."""
    caplog.set_level(logging.INFO, logger="opd")
    batches: list[list[list[dict[str, str]]]] = []
    real = trainer_eval.rollout_generator

    def recording(rollout_fn, **kw):
        generate = real(rollout_fn, **kw)

        def wrapped(messages, max_tokens):
            batches.append(list(messages))
            return generate(messages, max_tokens)

        return wrapped

    monkeypatch.setattr(trainer_eval, "rollout_generator", recording)
    run_dir = tmp_path / "one"
    args = [
        "--backend", "hf", "--teacher", str(tiny_models["teacher"]),
        "--student", str(tiny_models["teacher"]), "--heldout", "4", "--data", str(gsm8k_dir),
        "--run-dir", str(run_dir), "trainer.total_steps=1", *CONTEXT_SMALL,
    ]
    assert demo_main(args) == 0
    assert teacher_requests == []  # nothing went to the teacher's chat route
    log = caplog.text
    assert log.index("measuring the teacher (1-shot) on 4 held-out problems (on the rollout") < (
        log.index("training (rollout on hf"))
    heldout = load_gsm8k("test", gsm8k_dir, limit=4)
    first = batches[0]  # the teacher's row; the trainer's own evaluations come after it
    assert len(first) == 4
    for chat, ex in zip(first, heldout, strict=True):
        assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
        assert ex.question in chat[3]["content"]
    results = json.loads((run_dir / "results.json").read_text())
    _check_results(results, pair="context", steps=1, max_tokens=16)
    assert results["teacher_name"] == "teacher (1-shot)"


def test_demo_pruned_pair_runs(tiny_models, tmp_path, capsys, teacher_requests) -> None:
    run_dir = tmp_path / "pruned"
    args = [
        *_model_args(tiny_models),
        "--pair",
        "pruned",
        "--run-dir",
        str(run_dir),
        "trainer.total_steps=1",
        *SMALL,
    ]
    assert demo_main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    _check_results(results, pair="pruned", steps=1, max_tokens=16)
    assert results["teacher_context"]["few_shot"] == 0 and results["teacher_name"] == "teacher"
    # The pair's own config (demo_pruned.yaml), and the teacher asked as the student is.
    config = (run_dir / "train" / "config.yaml").read_text()
    assert "few_shot: 0" in config
    heldout = load_gsm8k("test", "bundled", limit=4)
    assert teacher_requests == [build_messages(ex.question) for ex in heldout]
    assert (run_dir / "train" / "plots" / EVAL_PROGRESS_FILE).is_file()
    assert "| teacher " in (run_dir / "results.md").read_text()


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu vme avx2 avx512f avx512bw", False),
        ("fpu avx512f avx512_bf16 avx512_vnni", True),
        ("fpu amx_bf16 amx_tile amx_int8", True),
        ("fpu avx512_bf16x", False),
    ],
)
def test_native_bf16_cpu_reads_the_cpu_flags(tmp_path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert native_bf16_cpu(cpuinfo) is native
    assert native_bf16_cpu(tmp_path / "missing") is False  # not Linux: float32


def test_keep_layers_is_for_the_pruned_pair(capsys) -> None:
    assert demo_main(["--keep-layers", "::3"]) == 2
    assert "--pair pruned only" in capsys.readouterr().err
    assert {p.name for p in PAIR_CONFIGS.values()} == {"demo_cpu.yaml", "demo_pruned.yaml"}


def test_teacher_row_is_asked_with_the_context(tiny_models, gsm8k_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["tokenizer"]))
    shots, _ = split_few_shot(load_gsm8k("train", gsm8k_dir), 4)
    cfg = TeacherContextConfig(few_shot=4)
    context = TeacherContext(cfg, shots, tokenizer)
    heldout = load_gsm8k("test", gsm8k_dir, limit=3)
    seen = []

    def fake(messages, max_tokens):
        seen.extend(messages)
        return [("The answer is \\boxed{18}.", 7), ("", 0), ("no no no no", 4)][: len(messages)]

    row = measure_teacher(fake, heldout, 16, context, context_label(cfg))
    assert row.name == "teacher (4-shot)" and row.reference and row.reverse_kl == 0.0
    assert [len(chat) for chat in seen] == [10, 10, 10]  # system, 4 x (user, assistant), user
    assert seen[0] == context.messages(heldout[0])
    assert [m["content"] for m in seen[0][2:9:2]] == [
        m["content"] for m in context.messages(heldout[1])[2:9:2]
    ]  # the same shots for every problem
    assert (row.format_rate, row.answer_rate, row.degenerate_frac) == (1 / 3, 1 / 3, 2 / 3)
    assert row.mean_length == pytest.approx(11 / 3)
    assert row.examples == ["The answer is \\boxed{18}.", ""]
    seen.clear()
    measure_teacher(fake, heldout, 16, None)  # no context: the student's prompt
    assert seen == [build_messages(ex.question) for ex in heldout]


def _fake_run(train_dir: Path) -> None:
    """A run's metrics and eval answers: 4 problems at steps 0 and 4, 2 at step 2, and a
    last evaluation on 2 only (as when the data ran out before the end)."""
    train_dir.mkdir(parents=True)
    evals = [
        (0, 4, [0, 0, 1, 0], 0.9),
        (2, 2, [1, 0], 0.7),
        (4, 4, [1, 1, 1, 0], 0.5),
        (5, 2, [0, 1], 0.4),
    ]
    with (
        open(train_dir / "metrics.jsonl", "w") as m,
        open(train_dir / "eval_samples.jsonl", "w") as e,
    ):
        for step, n, boxed, kl in evals:
            m.write(
                json.dumps(
                    {
                        "step": step,
                        "eval/accuracy": 0.25,
                        "eval/format_rate": sum(boxed) / n,
                        "eval/answer_rate": 0.75,
                        "eval/degenerate_frac": 0.0,
                        "eval/num_problems": n,
                        "eval/response_length/mean": 12.0,
                        "eval/reverse_kl": kl,
                        "eval/reverse_kl_per_answer": 10 * kl,
                    }
                )
                + "\n"
            )
            for i, b in enumerate(boxed):
                e.write(
                    json.dumps(
                        {
                            "step": step,
                            "index": i,
                            "formatted": bool(b),
                            "response": f"answer {i} at {step}",
                        }
                    )
                    + "\n"
                )
            if step:
                m.write(json.dumps({"step": step, "rollout/accuracy/mean": 0.5}) + "\n")


def test_rows_table_json_and_curve_from_a_run(tmp_path) -> None:
    train_dir = tmp_path / "train"
    _fake_run(train_dir)
    before, after, steps = student_rows(train_dir)
    assert steps == 4 and (before.format_rate, after.format_rate) == (0.25, 0.75)
    assert after.examples == ["answer 0 at 4", "answer 1 at 4"] and after.reverse_kl == 0.5
    assert (before.reverse_kl_per_answer, after.reverse_kl_per_answer) == (9.0, 5.0)

    # The curve: format rate on the 2 problems every evaluation answered; all 4 beside it.
    prog = eval_progress(train_dir)
    assert (prog.steps, prog.format_rate, prog.common) == ([0, 2, 4, 5], [0, 0.5, 1, 0.5], 2)
    assert prog.full == [(0, 0.25, 4), (4, 0.75, 4)]
    assert (prog.kl_steps, prog.reverse_kl) == ([0, 2, 4, 5], [0.9, 0.7, 0.5, 0.4])
    assert prog.reverse_kl_per_answer == [9.0, 7.0, 5.0, 4.0]
    assert plot_eval_progress([train_dir], tmp_path / "p.png").stat().st_size > 5000
    assert plot_eval_progress([tmp_path / "empty"], tmp_path / "q.png") is None

    problems = load_gsm8k("test", "bundled", limit=2)
    table = format_table(
        [before, after], problems, heldout=4, kl_prompts=2, max_tokens=16, steps=steps
    )
    rows = [line for line in table.splitlines() if line.startswith("| student")]
    assert [r.split("|")[1].strip() for r in rows] == ["student before", "student after"]
    assert "0.9000" in table and "75.0%" in table and "'answer 1 at 4'" in table
    assert [r.split("|")[6].strip() for r in rows] == ["9.00", "5.00"]  # nats/answer
    results = results_json(
        {"teacher": None, "student_before": before, "student_after": after},
        pair="context",
        context=TeacherContextConfig(few_shot=4),
        heldout=4,
        kl_prompts=2,
        steps=steps,
        seconds=1.0,
    )
    assert results["models"]["teacher"] is None
    assert set(results["models"]["student_after"]) == MODEL_KEYS
    json.dumps(results)  # serialisable


def test_run_dir_override_is_the_demo_run_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert split_run_dir(None, ["trainer.lr=1e-4"]) == (
        (tmp_path / DEFAULT_RUN_DIR).resolve(),
        ["trainer.lr=1e-4"],
    )
    assert split_run_dir("flag", ["run_dir=runs/x", "eval.limit=4"]) == (
        (tmp_path / "runs" / "x").resolve(),
        ["eval.limit=4"],
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


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_services(tiny_models, gsm8k_dir, tmp_path) -> None:
    run_dir = tmp_path / "demo"
    args = _demo_args(tiny_models, gsm8k_dir, run_dir) + [
        "trainer.total_steps=1000",
        *CONTEXT_SMALL,
    ]
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd.cli", "demo", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # A job started in the background by a non-interactive shell (`cmd &`) inherits
            # SIGINT ignored, and Python then never raises KeyboardInterrupt: give the demo
            # the default disposition, as a terminal would.
            preexec_fn=_default_sigint,
        )
    try:
        deadline = time.monotonic() + 240
        while "training (rollout on hf" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the demo never started training"
            time.sleep(0.5)
        time.sleep(3)  # inside the trainer's loop
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)  # services stop in turn; slow on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text(errors="replace")
    assert rc == 130 and "interrupted; services stopped" in text, text[-3000:]
    urls = _service_urls(text)
    assert len(urls) == 2 and all(_port_closed(u) for u in urls), text[-3000:]
