"""Where in the answers the held-out reverse KL sits: ``s - tau`` by position.

    python bench/kl_by_position.py examples/opd_gsm8k/demo_cpu.yaml student.model=MODEL_DIR \\
        --teacher-url http://127.0.0.1:8101 --rollout-url http://127.0.0.1:8102 \\
        [--load CHECKPOINT_DIR] [--prompts 32] [--samples 2] [--seeds 0 1]

The evaluation's reverse KL (``trainer.eval.measure_reverse_kl``) is one sum over every
sampled token, divided by the tokens or by the answers. This splits the same sum by the
token's position in its answer: the first 5 tokens, the next ones in blocks of 40, and the
last 5 (an answer's last 5 count there, not in their block). The rollout service samples
``--samples`` answers to each of the first ``--prompts`` held-out problems at the config's
rollout temperature, with each of ``--seeds``; the teacher scores them after its own prompt
(the config's ``teacher.context``, built as the trainer builds it). ``--load`` first makes the
rollout service serve a checkpoint directory (``POST /v1/weights/load``; it must lie inside
the service's ``--weights-dir``), so one pair of services can measure several students.

Prints, per seed, the mean ``s - tau`` per token in each block (and the block's token count),
the per-token and per-answer figures, the mean length, the answers cut at the token limit
and the blank or degenerate ones, with those answers' per-token KL apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/kl_by_position.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from trainer.eval import ReverseKL, sample_reverse_kl  # noqa: E402

HEAD = 5
TAIL = 5
BLOCK = 40


def position_label(i: int, length: int) -> str:
    """The block of position ``i`` (0-based) in an answer of ``length`` tokens."""
    if i < HEAD:
        return f"0-{HEAD - 1}"
    if i >= length - TAIL:
        return f"last {TAIL}"
    lo = (i // BLOCK) * BLOCK
    return f"{max(lo, HEAD)}-{lo + BLOCK - 1}"


@dataclass
class PositionKL:
    """``s - tau`` sums and token counts by block, and the whole-sample figures."""

    sums: dict[str, float]
    counts: dict[str, int]
    per_token: float
    per_answer: float
    mean_length: float


def kl_by_position(diffs: Sequence[np.ndarray]) -> PositionKL:
    """Group per-token ``s - tau`` arrays (one per answer) by position block."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for d in diffs:
        for i, v in enumerate(np.asarray(d, dtype=np.float64)):
            key = position_label(i, len(d))
            sums[key] = sums.get(key, 0.0) + float(v)
            counts[key] = counts.get(key, 0) + 1
    whole = ReverseKL.of(diffs)
    return PositionKL(
        sums=sums,
        counts=counts,
        per_token=whole.per_token,
        per_answer=whole.per_answer,
        mean_length=sum(len(d) for d in diffs) / len(diffs) if diffs else 0.0,
    )


def block_order(label: str) -> tuple[int, int]:
    """Sort key: the head first, the blocks by start, the tail last."""
    if label.startswith("last"):
        return (2, 0)
    return (0 if label.startswith("0-") else 1, int(label.split("-")[0]))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the training config (teacher context, data, rollout)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. student.model=DIR")
    p.add_argument("--teacher-url", required=True)
    p.add_argument("--rollout-url", required=True)
    p.add_argument("--load", help="a checkpoint directory for the rollout service to serve first")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    from transformers import AutoTokenizer

    from trainer.clients import RolloutClient, TeacherClient
    from trainer.config import load_config
    from trainer.grading import is_degenerate
    from trainer.startup import load_prompts

    args = parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"eval.limit={args.prompts}"])
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.tokenizer or cfg.student.model)
    prompts = load_prompts(cfg, tokenizer, is_main=True)
    problems, context = prompts.evals, prompts.teacher_context
    rollout = RolloutClient("rollout", args.rollout_url)
    teacher = TeacherClient("teacher", args.teacher_url)
    if args.load:
        version = rollout.weights_status().policy_version + 1  # versions only grow
        status = rollout.load_weights(str(Path(args.load).resolve()), version=version)
        print(f"rollout service serves {status.source} (policy_version {status.policy_version})")
    temperature = cfg.rollout.temperature
    for seed in args.seeds:
        samples = sample_reverse_kl(
            rollout.rollouts,
            teacher,
            problems,
            samples_per_prompt=args.samples,
            max_tokens=cfg.rollout.max_tokens,
            temperature=temperature,
            teacher_temperature=cfg.teacher_temperature,
            teacher_context=context,
            seed=seed,
        )
        diffs = [x.diffs for x in samples]
        res = kl_by_position(diffs)
        texts = [tokenizer.decode(x.token_ids, skip_special_tokens=True) for x in samples]
        degenerate = [is_degenerate(t) for t in texts]
        loops = ReverseKL.of([d for d, g in zip(diffs, degenerate, strict=True) if g])
        truncated = sum(len(x.token_ids) >= cfg.rollout.max_tokens for x in samples)
        print(
            f"\nseed {seed}: {len(diffs)} answers at temperature {temperature}: "
            f"{res.per_token:.3f} nats/token, {res.per_answer:.2f} nats/answer, mean length "
            f"{res.mean_length:.1f}, {truncated} at the token limit, {sum(degenerate)} blank or "
            f"degenerate ({loops.per_token:.3f} nats/token over their tokens)"
        )
        print("| positions | s - tau per token | tokens |\n|---|---|---|")
        for label in sorted(res.sums, key=block_order):
            n = res.counts[label]
            print(f"| {label} | {res.sums[label] / n:.3f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
