"""A short `opd train` on one device with the hf backend: the whole loop, timed per step.

    python bench/gpu_train_check.py --out gpu_check_out/train            # CUDA, Qwen2.5-0.5B shape
    python bench/gpu_train_check.py --device cpu --layers 2 --hidden 64 --intermediate 128 \\
        --heads 2 --kv-heads 1 --vocab 4096 --steps 2 --max-tokens 16    # a CPU smoke run

What runs: two random models with Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV
heads, MLP 4864, vocabulary 151,936, tied embeddings; ~494M parameters), saved in bf16, one
as the teacher and one as the student, with the project's tiny byte-level tokenizer (its 512
ids are a subset of the vocabulary; ids it does not know decode to nothing). Nothing is
downloaded. A teacher and a rollout service (`services.teacher`, `services.student_rollout`,
hf backend, on `--device`, bf16) run as local subprocesses; `python -m trainer` trains the
student on the bundled GSM8K prompts (float32 master weights, bf16 autocast on CUDA, the
fused LM-head and loss kernels where the trainer picks them) and pushes each version to the
rollout service through a weights directory. Eval and checkpoints are off: the step is
sample, score, train, push.

Random weights sample near-uniformly over 151,936 ids, so every response runs to
`--max-tokens` (the longest step of that shape). What this shows is the loop working on the
device and where a step's time goes; the quality of the student is not measured. Output: the
per-step table (`timing/*_s` and `throughput/tokens_per_s` from the run's metrics.jsonl) on stdout and `--out/summary.json`;
the services' logs and the run directory (metrics.jsonl) stay under `--out`; the models
and pushed weights go to a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/gpu_train_check.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from opd.demo import running_services  # noqa: E402

CONFIG = REPO_ROOT / "examples" / "opd_gsm8k" / "demo_pruned.yaml"
PARTS = ("rollout", "score", "wait", "train", "weight_sync", "step")


def build_models(args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """Teacher and student directories: random Qwen2-architecture models in bf16."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.tiny import build_tokenizer

    tok_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tok_dir)
    dirs = []
    for name, seed in (("teacher", 1), ("student", 2)):
        out = root / name
        config = Qwen2Config(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(seed)
        # Initialised on the device: a 0.5B model is built in seconds there, minutes on 1 CPU.
        with torch.device(args.device):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        del model
        dirs.append(out)
    return dirs[0], dirs[1]


def overrides(args: argparse.Namespace, teacher: Path, student: Path, urls: tuple[str, str],
              run_dir: Path, weights_dir: Path) -> list[str]:
    """The trainer's `key=value` arguments on top of the demo's pruned-pair config."""
    cuda = args.device.startswith("cuda")
    return [
        f"run_dir={run_dir}",
        f"student.model={student}",
        f"student.device={args.device}",
        "student.dtype=float32",
        *(["student.autocast_dtype=bfloat16"] if cuda else []),
        f"teacher.model={teacher}",
        f"services.teacher_url={urls[0]}",
        f"services.rollout_url={urls[1]}",
        "sync.method=load",
        f"sync.shared_dir={weights_dir}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.samples_per_prompt={args.samples}",
        f"rollout.max_tokens={args.max_tokens}",
        f"trainer.total_steps={args.steps}",
        "eval.at_start=false",
        "eval.at_end=false",
        "eval.interval=0",
        "checkpoint.at_end=false",
        "logging.metrics_port=0",
        "logging.progress_bar=false",
    ]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step timings and the median over steps after the first (the warm-up)."""
    steps = [r for r in records if r.get("timing/step_s") is not None]
    rows = [{p: r.get(f"timing/{p}_s") for p in PARTS} | {"n": r.get("step"),
            "tok_s": r.get("throughput/tokens_per_s")}
            for r in steps]
    later = [r["step"] for r in rows[1:]] or [r["step"] for r in rows]
    return {"steps": rows, "median_step_s_after_first": statistics.median(later) if later else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out/train"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    args = p.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Models and pushed weights (GBs at the default shape) stay out of --out, which is for
    # the logs, the metrics and the summary.
    work = Path(tempfile.mkdtemp(prefix="opd-gpu-train-"))
    try:
        return _run(args, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, out: Path, work: Path) -> int:
    t0 = time.monotonic()
    teacher, student = build_models(args, work / "models")
    build_s = time.monotonic() - t0
    weights_dir, run_dir = work / "weights", out / "run"
    weights_dir.mkdir()
    t1 = time.monotonic()
    with running_services(teacher, student, weights_dir, "hf", out, args.ready_timeout,
                          dtype="bfloat16", device=args.device) as (t_svc, r_svc):
        ready_s = time.monotonic() - t1
        cmd = [sys.executable, "-m", "trainer", str(CONFIG),
               *overrides(args, teacher, student, (t_svc.base_url, r_svc.base_url), run_dir,
                          weights_dir)]
        env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
        t2 = time.monotonic()
        with (out / "trainer.log").open("w") as log:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
        train_s = time.monotonic() - t2
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = summarize(records) | {
        "device": args.device, "returncode": rc, "build_models_s": build_s,
        "services_ready_s": ready_s, "trainer_wall_s": train_s,
        "shape": {k: getattr(args, k) for k in ("prompts", "samples", "max_tokens", "layers",
                                                  "hidden", "vocab")},
    }
    if args.device.startswith("cuda"):
        import torch

        summary["device_name"] = torch.cuda.get_device_name(0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"models built in {build_s:.1f}s, services ready in {ready_s:.1f}s, "
          f"trainer exited {rc} after {train_s:.1f}s (log: {out / 'trainer.log'})")
    print("| step | " + " | ".join(f"{p} s" for p in PARTS) + " | response tok/s |")
    print("|---" * (len(PARTS) + 2) + "|")
    for row in summary["steps"]:
        cells = [f"{row[p]:.2f}" if isinstance(row[p], float) else "" for p in PARTS]
        print(f"| {row['n']} | " + " | ".join(cells) + f" | {row['tok_s'] or 0:.0f} |")
    print(f"median step after the first: {summary['median_step_s_after_first']}")
    if rc != 0:
        print((out / "trainer.log").read_text()[-3000:], file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
