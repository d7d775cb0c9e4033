"""Peer benchmark: TRL's ``DistillationTrainer`` against ``opd train``, same work, same machine.

    pip install 'trl==1.16.*'        # not part of the project's install
    python bench/peer_trl.py                          # 8 prompts x 4 samples x 128 tokens, 4 steps
    python bench/peer_trl.py --steps 2 --prompts 2 --samples 2 --max-tokens 16   # a quick check
    python bench/peer_trl.py --only opd --opd-backend hf --json-out peer.json

Both sides distill the same teacher into the same student (default: the demo's pruned pair,
SmolLM2-135M-Instruct and its depth-pruned copy, prepared offline by
:func:`opd.demo_models.prepare_demo_models`; ``--teacher``/``--student`` take directories),
in float32, on the same GSM8K prompts (the bundled subset, the project's chat messages), one
side after the other: opd first (teacher and rollout services started as ``opd demo`` starts
them, stopped before TRL starts), then TRL in this process. ``torch.set_num_threads`` is left
at its default on both sides. It prints and (``--json-out``) writes seconds per optimizer step
(median; with 3 or more steps the first, the warm-up, is left out), response tokens per
second over the same steps, and the ratio TRL s/step / opd s/step.

One step, each side: ``--prompts`` prompts x ``--samples`` samples (32 sequences by default),
at most ``--max-tokens`` new tokens each, temperature ``rollout.temperature``, the same
prompts in the same order (opd's seeded prompt sampler decides; TRL gets those rows, each
prompt repeated ``--samples`` times, unshuffled), AdamW with the pair config's lr (or
``--lr``), weight decay, betas, gradient clipping, constant schedule.

* opd (``timing/step_s`` from the run's ``metrics.jsonl``): sampling on the rollout service
  (``--opd-backend``, vLLM when installed, as the demo), scoring the sampled tokens on the
  teacher service (hf), grading, the student's forward/backward and AdamW step in the
  trainer, and pushing the new weights to the rollout service (``max_staleness 0``: no
  overlap between steps). Evaluation, checkpoints and the metrics server are off.
* TRL (``on_step_begin`` to ``on_step_end``): HF ``generate`` with the student in this
  process, the teacher's forward, the student's forward/backward and the optimizer step;
  ``beta=1`` (reverse KL), and ``DistillationTrainer`` 1.16 is always on-policy (it has no
  ``lmbda``). Logging after the step is outside the span.

What differs: opd's loss is the per-token reverse KL on the sampled tokens (the teacher
returns their logprobs), TRL's the full-vocabulary reverse KL (the teacher's whole
distribution, chunked); opd's sequences stop at EOS one by one and are micro-batched by
length, TRL generates the batch together, padded to its longest sequence; opd pays an HTTP hop
and a weight sync per step that TRL, in one process, does not. Response tokens are the sampled
tokens (EOS included) on both sides, from opd's metrics and TRL's ``completions/mean_length``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/peer_trl.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from opd.demo import PAIR_CONFIGS, default_backend, running_services  # noqa: E402

CONFIG = PAIR_CONFIGS["pruned"]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/peer_trl.py", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per side")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens per sample")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    p.add_argument("--only", choices=["trl", "opd"], default=None, help="run one side only")
    p.add_argument(
        "--opd-backend",
        choices=["vllm", "hf"],
        default=None,
        help="opd's rollout backend (default: the demo's, vllm when installed)",
    )
    p.add_argument("--teacher", default=None, help="teacher checkpoint dir (with --student)")
    p.add_argument("--student", default=None, help="student checkpoint dir (with --teacher)")
    p.add_argument("--run-dir", default="runs/peer_trl", help="where both runs write")
    p.add_argument("--json-out", default=None, help="also write the figures here as JSON")
    args = p.parse_args(list(argv))
    if (args.teacher is None) != (args.student is None):
        p.error("--teacher and --student go together")
    if min(args.steps, args.prompts, args.samples, args.max_tokens) < 1:
        p.error("--steps, --prompts, --samples and --max-tokens must be at least 1")
    return args


def summarize(
    side: str, step_s: Sequence[float], tokens: Sequence[int], exact: bool = True
) -> dict[str, Any]:
    """One side's figures; the first step is left out when 3 or more ran (it pays warm-up:
    allocations, kernel selection, first weight load), fewer leave nothing to compare."""
    skip = 1 if len(step_s) >= 3 else 0
    times, toks = list(step_s)[skip:], list(tokens)[skip:]
    total_s = sum(times)
    return {
        "side": side,
        "steps": len(step_s),
        "warmup_steps_excluded": skip,
        "step_s": list(step_s),
        "response_tokens": list(tokens),
        "median_step_s": statistics.median(times) if times else None,
        "tokens_per_s": sum(toks) / total_s if total_s > 0 else None,
        "tokens_exact": exact,
    }


def ratio(trl: dict[str, Any] | None, opd: dict[str, Any] | None) -> float | None:
    """TRL s/step over opd s/step (above 1: opd is faster), when both sides ran."""
    if not trl or not opd or not trl["median_step_s"] or not opd["median_step_s"]:
        return None
    return trl["median_step_s"] / opd["median_step_s"]


def table(results: Sequence[dict[str, Any]], r: float | None) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [
        "| side | s/step (median) | response tok/s | ratio (TRL/opd s/step) |",
        "|---|---|---|---|",
    ]
    for res in results:
        tok = num(res["tokens_per_s"], ".1f") + ("" if res["tokens_exact"] else " (upper bound)")
        rel = num(r, ".2f") if res["side"] == "trl" else ("1.00" if r is not None else "n/a")
        rows.append(f"| {res['side']} | {num(res['median_step_s'], '.2f')} | {tok} | {rel} |")
    return "\n".join(rows)


def opd_overrides(args: argparse.Namespace, student: str, run_dir: Path) -> list[str]:
    """The pair config made into the benchmark's shape, with everything outside the step off."""
    return [
        f"run_dir={run_dir / 'opd' / 'train'}",
        f"student.model={student}",
        "data.source=bundled",
        f"sync.shared_dir={run_dir / 'opd' / 'weights' / 'sync'}",
        "sync.max_staleness=0",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.samples_per_prompt={args.samples}",
        f"rollout.max_tokens={args.max_tokens}",
        f"trainer.total_steps={args.steps}",
        "trainer.lr_schedule=constant",
        "trainer.warmup_steps=0",
        *([f"trainer.lr={args.lr}"] if args.lr is not None else []),
        "eval.at_start=false",
        "eval.at_end=false",
        "eval.interval=0",
        "checkpoint.interval=0",
        "checkpoint.at_end=false",
        "logging.metrics_port=0",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]


def run_opd(args: argparse.Namespace, teacher: str, student: str, run_dir: Path) -> dict[str, Any]:
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.observability import METRICS_FILE

    overrides = opd_overrides(args, student, run_dir)
    cfg = load_config(CONFIG, overrides)  # a bad override fails before anything starts
    backend = args.opd_backend or default_backend()
    for d in ("logs", "weights"):
        (run_dir / "opd" / d).mkdir(parents=True, exist_ok=True)
    with running_services(
        teacher,
        student,
        run_dir / "opd" / "weights",
        backend,
        run_dir / "opd" / "logs",
        ready_timeout_s=900,
        max_model_len=cfg.trainer.max_model_len,
        teacher_backend="hf",
    ) as (t_svc, r_svc):
        cfg = load_config(
            CONFIG,
            [
                *overrides,
                f"services.teacher_url={t_svc.base_url}",
                f"services.rollout_url={r_svc.base_url}",
            ],
        )
        train_dir = train(cfg)
    records = [
        json.loads(line)
        for line in (train_dir / METRICS_FILE).read_text().splitlines()
        if line.strip()
    ]
    steps = [r for r in records if r.get("timing/step_s") is not None]
    tokens = [round(r["rollout/response_length/mean"] * r["rollout/num_samples"]) for r in steps]
    res = summarize("opd", [r["timing/step_s"] for r in steps], tokens)
    res |= {"rollout_backend": backend, "lr": cfg.trainer.lr}
    return res


def step_prompts(args: argparse.Namespace, student: str) -> list[list[dict[str, str]]]:
    """The chat prompts of every step, in opd's order, each repeated ``--samples`` times."""
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.data import build_messages
    from trainer.startup import load_prompts

    cfg = load_config(CONFIG, opd_overrides(args, student, Path(args.run_dir)))
    sampler = load_prompts(cfg, AutoTokenizer.from_pretrained(student), is_main=False).sampler
    return [
        build_messages(ex.question)
        for _ in range(args.steps)
        for ex in sampler.next_batch(args.prompts)
        for _ in range(args.samples)
    ]


def run_trl(args: argparse.Namespace, teacher: str, student: str, run_dir: Path) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from trainer.config import load_config

    cfg = load_config(CONFIG, opd_overrides(args, student, run_dir))
    t = cfg.trainer
    sequences = args.prompts * args.samples
    dataset = Dataset.from_list([{"prompt": m} for m in step_prompts(args, student)])

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step and its sampled tokens (TRL logs the step's
        mean completion length; logging_steps=1 makes that one step's)."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.tokens: list[int] = []
            self._t0 = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.step_s.append(time.perf_counter() - self._t0)

        def on_log(self, *_: Any, logs: dict[str, float] | None = None, **__: Any) -> None:
            if logs and logs.get("completions/mean_length") is not None:
                self.tokens.append(round(logs["completions/mean_length"] * sequences))

    timer = StepTimer()
    config = DistillationConfig(
        output_dir=str(run_dir / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=sequences,  # the whole step in one generate and one backward
        gradient_accumulation_steps=1,
        learning_rate=t.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_epsilon=t.eps,
        max_grad_norm=t.grad_clip or 0.0,
        max_completion_length=args.max_tokens,
        temperature=cfg.rollout.temperature,
        top_p=1.0,
        top_k=0,
        beta=1.0,
        shuffle_dataset=False,  # keep opd's prompt order
        bf16=False,  # TRL's default; the comparison is float32 on both sides
        gradient_checkpointing=False,  # TRL's default is on, opd's off
        model_init_kwargs={"dtype": "float32"},
        teacher_model_init_kwargs={"dtype": "float32"},
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, callbacks=[timer]
    )
    trainer.train()
    exact = len(timer.tokens) == len(timer.step_s)
    tokens = timer.tokens if exact else [sequences * args.max_tokens] * len(timer.step_s)
    res = summarize("trl", timer.step_s, tokens, exact=exact)
    res |= {"trl_version": trl.__version__, "lr": t.lr}
    return res


def models(args: argparse.Namespace) -> tuple[str, str]:
    if args.teacher is not None:
        return args.teacher, args.student
    from opd.demo_models import prepare_demo_models

    pair = prepare_demo_models()  # cached after the first call
    return str(pair.teacher_dir), str(pair.student_dir)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    teacher, student = models(args)
    run_dir = Path(args.run_dir).expanduser().resolve()
    results: list[dict[str, Any]] = []
    if args.only != "trl":
        results.append(run_opd(args, teacher, student, run_dir))
        gc.collect()  # the opd student must not share the memory with TRL's two models
    if args.only != "opd":
        results.append(run_trl(args, teacher, student, run_dir))
    by_side = {r["side"]: r for r in results}
    r = ratio(by_side.get("trl"), by_side.get("opd"))
    shape = {
        "prompts": args.prompts,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "steps": args.steps,
        "teacher": teacher,
        "student": student,
    }
    print(
        f"\n{args.prompts} prompts x {args.samples} samples x {args.max_tokens} new tokens, "
        f"{args.steps} steps per side; "
        + (
            "the first step (warm-up) is left out of the figures"
            if args.steps >= 3
            else "every step counted (fewer than 3: no warm-up step left out)"
        )
    )
    print(table(results, r))
    if args.json_out:
        out = {"shape": shape, "results": results, "ratio_trl_over_opd": r}
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
