"""``opd plot RUN_DIR [RUN_DIR ...]``: PNG plots of one run (or several, overlaid).

Writes into ``RUN_DIR/plots/`` (or ``--out``):

* ``accuracy.png``       -- rollout accuracy per step (GSM8K, graded samples), eval accuracy on top;
* ``kl.png``             -- per-sequence reverse KL and per-token JSD of the samples (and
  ``eval/reverse_kl`` on held-out prompts when it was measured);
* ``eval_accuracy.png``  -- greedy test accuracy and format rate at each evaluation;
* ``eval_progress.png``  -- held-out format rate and reverse KL to the teacher at each
  evaluation (:func:`plot_eval_progress`);
* ``timing.png``         -- per-step time breakdown: rollout / score / train / weight sync;
* ``loss.png``           -- policy loss, PPO KL, clip fraction and gradient norm.

Matplotlib runs on the Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.observability import EVAL_SAMPLES_FILE, read_metrics

__all__ = [
    "EVAL_PROGRESS_FILE",
    "EvalProgress",
    "eval_progress",
    "main",
    "plot_eval_progress",
    "plot_runs",
]

EVAL_PROGRESS_FILE = "eval_progress.png"

TIMING_PARTS = ("timing/rollout_s", "timing/score_s", "timing/train_s", "timing/weight_sync_s")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _lines(
    ax: Any, runs: dict[str, list[dict[str, Any]]], key: str, label: str | None = None, **kw: Any
) -> bool:
    drew = False
    for name, records in runs.items():
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, label=f"{label or key}" + (f" ({name})" if len(runs) > 1 else ""), **kw)
            drew = True
    return drew


def _finish(fig: Any, ax_list: Sequence[Any], path: Path) -> Path:
    for ax in ax_list:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@dataclass
class EvalProgress:
    """A run's evaluations, comparable from step to step.

    When the evaluations between start and end use fewer problems (``eval.interval_limit``),
    ``format_rate`` is on the ``common`` first problems every evaluation answered (the
    greedy answers in eval_samples.jsonl); ``full`` has the steps whose evaluation saw more,
    with their own format rate.
    """

    steps: list[int] = field(default_factory=list)
    format_rate: list[float] = field(default_factory=list)
    common: int = 0
    full: list[tuple[int, float, int]] = field(default_factory=list)  # (step, rate, problems)
    kl_steps: list[int] = field(default_factory=list)
    reverse_kl: list[float] = field(default_factory=list)
    #: Per answer (nats/answer), at ``kl_steps``; empty for runs that did not log it.
    reverse_kl_per_answer: list[float] = field(default_factory=list)


def _eval_answers(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    path = run_dir / EVAL_SAMPLES_FILE
    by_step: dict[int, list[dict[str, Any]]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                by_step.setdefault(int(record["step"]), []).append(record)
    return by_step


def eval_progress(run_dir: str | Path) -> EvalProgress:
    """Held-out format rate and reverse KL at each evaluation of ``run_dir`` (see
    :class:`EvalProgress`)."""
    run_dir = Path(run_dir)
    evals = [r for r in read_metrics(run_dir) if r.get("eval/format_rate") is not None]
    out = EvalProgress()
    for r in evals:
        if r.get("eval/reverse_kl") is not None:
            out.kl_steps.append(r["step"])
            out.reverse_kl.append(float(r["eval/reverse_kl"]))
            if r.get("eval/reverse_kl_per_answer") is not None:
                out.reverse_kl_per_answer.append(float(r["eval/reverse_kl_per_answer"]))
    if len(out.reverse_kl_per_answer) != len(out.kl_steps):
        out.reverse_kl_per_answer = []  # logged at some evaluations only: not plotted
    sizes = [int(r.get("eval/num_problems") or 0) for r in evals]
    out.common = min(sizes, default=0)
    answers = _eval_answers(run_dir) if len(set(sizes)) > 1 else {}
    for r, size in zip(evals, sizes, strict=True):
        rate = float(r["eval/format_rate"])
        if size > out.common:
            out.full.append((r["step"], rate, size))
            # The last `size` answers of the step (a resumed run may have logged it twice).
            subset = answers.get(r["step"], [])[-size:][: out.common]
            if len(subset) < out.common:
                continue
            rate = sum(bool(a.get("formatted")) for a in subset) / out.common
        out.steps.append(r["step"])
        out.format_rate.append(rate)
    return out


def plot_eval_progress(run_dirs: Sequence[str | Path], path: str | Path) -> Path | None:
    """Held-out format rate (left) and reverse KL to the teacher (right) against the step, one
    line per run; ``None`` (nothing written) when no run has evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {Path(d).name or str(d): eval_progress(d) for d in run_dirs}
    if not any(p.steps or p.full for p in runs.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    per_answer = axes[1].twinx() if any(p.reverse_kl_per_answer for p in runs.values()) else None
    for name, prog in runs.items():
        tag = f" ({name})" if len(runs) > 1 else ""
        label = "format rate" + (f", first {prog.common} problems" if prog.full else "")
        axes[0].plot(prog.steps, prog.format_rate, marker="o", label=label + tag)
        if prog.full:
            sizes = sorted({n for _, _, n in prog.full})
            axes[0].plot(
                [s for s, _, _ in prog.full],
                [f for _, f, _ in prog.full],
                marker="s",
                linestyle="none",
                label=f"format rate, all {'/'.join(map(str, sizes))} problems" + tag,
            )
        if not prog.kl_steps:
            continue
        (line,) = axes[1].plot(prog.kl_steps, prog.reverse_kl, marker="o", label="per token" + tag)
        if per_answer is not None and prog.reverse_kl_per_answer:
            per_answer.plot(  # the run's colour, dashed: one run, two scales
                prog.kl_steps,
                prog.reverse_kl_per_answer,
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label="per answer (right axis)" + tag,
            )
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of answers ending in \\boxed{}")
    axes[0].set_title("Held-out format rate (greedy)")
    axes[1].set_ylabel("nats per token")
    if per_answer is not None:
        per_answer.set_ylabel("nats per answer")
        per_answer.legend(loc="lower center", fontsize=8)
    has_kl = any(p.kl_steps for p in runs.values())
    axes[1].set_title("Held-out reverse KL to the teacher" + ("" if has_kl else ": not measured"))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    written = _finish(fig, axes, Path(path))
    plt.close(fig)
    return written


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for ``run_dirs`` into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(d) for d in run_dirs}
    if not any(runs.values()):
        raise FileNotFoundError(f"no metrics.jsonl records in {', '.join(map(str, run_dirs))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    _lines(ax, runs, "rollout/accuracy/mean", "rollout accuracy")
    _lines(ax, runs, "eval/accuracy", "eval accuracy (greedy)", marker="o", linestyle="--")
    ax.set_ylabel("GSM8K accuracy")
    ax.set_title("Accuracy")
    written.append(_finish(fig, [ax], out / "accuracy.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _lines(axes[0], runs, "rollout/kl_divergence/mean", "reverse KL per sequence (nats)")
    axes[0].set_title("KL(student || teacher) on the samples")
    _lines(axes[1], runs, "rollout/jsd/mean", "JSD per token")
    if _lines(axes[1], runs, "eval/reverse_kl", "eval reverse KL per token", marker="o"):
        axes[1].set_title("JSD / held-out reverse KL (per token)")
    else:
        axes[1].set_title("JSD per token")
    written.append(_finish(fig, axes, out / "kl.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    _lines(ax, runs, "eval/accuracy", "eval accuracy", marker="o")
    _lines(ax, runs, "eval/format_rate", "eval format rate", marker="s", linestyle=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("GSM8K test (greedy)")
    written.append(_finish(fig, [ax], out / "eval_accuracy.png"))
    plt.close(fig)
    progress = plot_eval_progress(run_dirs, out / EVAL_PROGRESS_FILE)
    if progress is not None:
        written.append(progress)

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.5 * len(runs)), squeeze=False)
    for ax, (name, records) in zip(axes[:, 0], runs.items(), strict=True):
        steps = [r for r in records if r.get("timing/step_s") is not None]
        x = [r["step"] for r in steps]
        bottom = [0.0] * len(steps)
        for key in TIMING_PARTS:
            vals = [float(r.get(key) or 0.0) for r in steps]
            ax.bar(x, vals, bottom=bottom, label=key.split("/")[1].removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.plot(
            x, [r["timing/step_s"] for r in steps], color="black", marker=".", label="step (wall)"
        )
        ax.set_ylabel("seconds")
        ax.set_title(f"Time per step: {name}")
    written.append(_finish(fig, list(axes[:, 0]), out / "timing.png"))
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key in zip(
        axes.flat,
        ("actor/pg_loss", "actor/ppo_kl", "actor/pg_clipfrac", "actor/grad_norm"),
        strict=True,
    ):
        _lines(ax, runs, key)
        ax.set_title(key)
    written.append(_finish(fig, list(axes.flat), out / "loss.png"))
    plt.close(fig)
    return written


def main(argv: Sequence[str]) -> int:
    """Entry point of ``opd plot``."""
    p = argparse.ArgumentParser(prog="opd plot", description="PNG plots of training runs.")
    p.add_argument("run_dirs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/plots of the first run)"
    )
    args = p.parse_args(list(argv))
    out = args.out or str(Path(args.run_dirs[0]) / "plots")
    try:
        written = plot_runs(args.run_dirs, out)
    except FileNotFoundError as exc:
        print(f"opd plot: error: {exc}")
        return 1
    for path in written:
        print(path)
    return 0
