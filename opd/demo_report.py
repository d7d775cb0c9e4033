"""`opd demo`'s results: the teacher / student-before / student-after table and results.json.

Every row is measured on the same held-out problems (the first ``eval.limit`` GSM8K test
problems, greedy): the student's two rows are the trainer's own evaluations at the start and
the end of the run (``metrics.jsonl`` and ``eval_samples.jsonl``), the teacher's is measured by
the demo with the teacher's own context (:func:`teacher_row`). Its reverse KL to itself is 0 by
definition ("0 (reference)").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.config_sections import TeacherContextConfig
    from trainer.data import Example
    from trainer.eval import EvalResult, Generate
    from trainer.teacher_context import TeacherContext

__all__ = [
    "EXAMPLES",
    "RESULTS_JSON",
    "RESULTS_MD",
    "Row",
    "context_label",
    "format_table",
    "measure_teacher",
    "report",
    "results_json",
    "student_rows",
    "teacher_row",
    "write_results",
]

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
#: Held-out problems whose greedy answers the table shows, per model.
EXAMPLES = 2
#: Characters of each answer shown in the table (the JSON has them whole).
SHOWN_CHARS = 100


@dataclass
class Row:
    """One model's line of the table (rates are fractions)."""

    name: str
    format_rate: float
    answer_rate: float
    accuracy: float
    reverse_kl: float | None  # None: not measured
    mean_length: float  # tokens
    degenerate_frac: float
    #: The greedy answers to the first :data:`EXAMPLES` held-out problems.
    examples: list[str] = field(default_factory=list)
    #: The teacher: its reverse KL to itself is 0 by definition.
    reference: bool = False
    #: The same estimate as ``reverse_kl`` per answer (nats/answer) instead of per token.
    reverse_kl_per_answer: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The row as results.json holds it."""
        return {
            "format_rate": self.format_rate,
            "answer_rate": self.answer_rate,
            "accuracy": self.accuracy,
            "reverse_kl": self.reverse_kl,
            "reverse_kl_per_answer": self.reverse_kl_per_answer,
            "mean_length": self.mean_length,
            "degenerate_frac": self.degenerate_frac,
            "examples": list(self.examples),
        }


def context_label(context: TeacherContextConfig) -> str:
    """What the teacher saw beside the question, for its row: ``"teacher (4-shot)"``."""
    parts = []
    if context.few_shot:
        parts.append(f"{context.few_shot}-shot")
    if context.system:
        parts.append("own system prompt")
    if context.reference_solution:
        parts.append("reference solution")
    return "teacher" + (f" ({', '.join(parts)})" if parts else "")


def teacher_row(name: str, result: EvalResult) -> Row:
    """The teacher's row from its graded greedy answers."""
    return Row(
        name,
        result.format_rate,
        result.answer_rate,
        result.accuracy,
        0.0,
        result.mean_response_tokens,
        result.degenerate_frac,
        [r["response"] for r in result.records[:EXAMPLES]],
        reference=True,
        reverse_kl_per_answer=0.0,
    )


def measure_teacher(
    generate: Generate,
    heldout: Sequence[Example],
    max_tokens: int,
    context: TeacherContext | None,
    name: str = "teacher",
) -> Row:
    """The teacher's row: its greedy answers to ``heldout``, asked with its own context
    (``context.messages``) when it has one, else with the student's prompt."""
    from trainer.eval import evaluate

    messages_for = context.messages if context is not None and context.active else None
    return teacher_row(name, evaluate(generate, heldout, max_tokens, messages_for=messages_for))


def _records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _eval_row(name: str, metrics: Mapping[str, Any], answers: Sequence[dict[str, Any]]) -> Row:
    size = int(metrics.get("eval/num_problems") or 0)
    # The last evaluation logged at that step (a resumed run may have logged one twice).
    at_step = [a for a in answers if a["step"] == metrics["step"]]
    at_step = at_step[-size:] if size else at_step
    return Row(
        name,
        float(metrics["eval/format_rate"]),
        float(metrics.get("eval/answer_rate", 0.0)),
        float(metrics["eval/accuracy"]),
        metrics.get("eval/reverse_kl"),
        float(metrics.get("eval/response_length/mean", 0.0)),
        float(metrics.get("eval/degenerate_frac", 0.0)),
        [a["response"] for a in at_step[:EXAMPLES]],
        reverse_kl_per_answer=metrics.get("eval/reverse_kl_per_answer"),
    )


def student_rows(train_dir: Path) -> tuple[Row, Row, int]:
    """``(before, after, step)``: the student at the run's first evaluation and at its last
    one on the same problems (the evaluations in between may use fewer:
    ``eval.interval_limit``), and the step of the latter."""
    from trainer.observability import EVAL_SAMPLES_FILE, METRICS_FILE

    evals = [r for r in _records(train_dir / METRICS_FILE) if "eval/accuracy" in r]
    if not evals:
        raise RuntimeError(f"no evaluation in {train_dir}")
    first = evals[0]
    same = [r for r in evals[1:] if r.get("eval/num_problems") == first.get("eval/num_problems")]
    if not same:
        raise RuntimeError(f"expected evaluations at start and end in {train_dir}")
    last = same[-1]
    answers = _records(train_dir / EVAL_SAMPLES_FILE)
    before = _eval_row("student before", first, answers)
    after = _eval_row("student after", last, answers)
    return before, after, int(last["step"])


def _kl(row: Row, value: float | None, digits: int) -> str:
    if row.reference:
        return "0 (reference)"
    return "not measured" if value is None else f"{value:.{digits}f}"


COLUMNS = (
    "model",
    "format rate",
    "answer rate",
    "accuracy",
    "reverse KL (nats/token)",
    "reverse KL (nats/answer)",
    "mean length (tokens)",
    "blank or degenerate",
)


def format_table(
    rows: Sequence[Row],
    problems: Sequence[Example],
    *,
    heldout: int,
    kl_prompts: int,
    max_tokens: int,
    steps: int,
) -> str:
    """The table (Markdown), its legend and each model's greedy answers to ``problems``."""
    cells = [
        [
            r.name,
            f"{r.format_rate:.1%}",
            f"{r.answer_rate:.1%}",
            f"{r.accuracy:.1%}",
            _kl(r, r.reverse_kl, 4),
            _kl(r, r.reverse_kl_per_answer, 2),
            f"{r.mean_length:.1f}",
            f"{r.degenerate_frac:.1%}",
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [list(COLUMNS), *cells]) for i in range(len(COLUMNS))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| "
        + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths))
        + " |"
    )
    out = [line(COLUMNS), rule, *(line(c) for c in cells), ""]
    out.append(
        f"Held-out: the first {heldout} GSM8K test problems, answered greedily (at most "
        f"{max_tokens} tokens); student before = step 0, after = step {steps}. Format rate: "
        "the answer ends in a `\\boxed{}`; answer rate: an answer is stated (boxed, `####` or "
        '"the answer is"); accuracy: the answer is correct in whatever form; reverse KL on '
        f"the first {kl_prompts}, sampled at the rollout temperature, the sum of the student's "
        "minus the teacher's logprobs over the sampled tokens divided by the tokens and by the "
        "answers (the KL between the two models' answers, up to the token limit; answers that "
        "get shorter can lower it while the per-token figure rises); blank or degenerate: "
        "empty, one short unit repeated, or the same line three times or more."
    )
    width = max(len(r.name) for r in rows) + 1 if rows else 1
    out += ["", f"Greedy answers (escaped, first {SHOWN_CHARS} characters):", "", "```"]
    for i, ex in enumerate(problems[:EXAMPLES]):
        question = ex.question if len(ex.question) <= 80 else ex.question[:77] + "..."
        out.append(f"problem {i + 1} (answer {ex.ground_truth}): {ascii(question)}")
        for r in rows:
            text = r.examples[i] if i < len(r.examples) else ""
            shown = ascii(text[:SHOWN_CHARS]) + ("..." if len(text) > SHOWN_CHARS else "")
            out.append(f"  {r.name + ':':<{width}} {shown}")
    out.append("```")
    return "\n".join(out)


def results_json(
    rows: Mapping[str, Row | None],
    *,
    pair: str,
    context: TeacherContextConfig,
    heldout: int,
    kl_prompts: int,
    steps: int,
    seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json: the figures of the table (``rows`` by key: teacher, student_before,
    student_after; None, written as null: not measured) and what they were measured on."""
    return {
        "pair": pair,
        "teacher_context": context.model_dump(mode="json"),
        "heldout": heldout,
        "kl_prompts": kl_prompts,
        "steps": steps,
        "seconds": round(seconds, 1),
        **(extra or {}),
        "models": {key: row.as_json() if row else None for key, row in rows.items()},
    }


def _change(old: float, new: float) -> str:
    """``"fell by 0.0350 (34%): 0.1030 -> 0.0680."``"""
    rel = abs(new - old) / old if old else 0.0
    verb = "fell" if new < old else "rose"
    return f"{verb} by {abs(new - old):.4f} ({rel:.0%}): {old:.4f} -> {new:.4f}."


def write_results(run_dir: Path, table: str, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write results.md and results.json into ``run_dir``; returns their paths."""
    md, js = run_dir / RESULTS_MD, run_dir / RESULTS_JSON
    md.write_text(table + "\n", encoding="utf-8")
    js.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return md, js


def report(
    run_dir: Path,
    train_dir: Path,
    rows3: tuple[Row | None, Row, Row],
    *,
    pair: str,
    cfg: TrainConfig,
    heldout: Sequence[Example],
    kl_prompts: int,
    steps: int,
    seconds: float,
) -> None:
    """The demo's ending: plots (the run's, with the curve), results.md, results.json, and
    the summary on stdout. ``rows3``: teacher (None: not measured), student before, after."""
    from trainer.plots import EVAL_PROGRESS_FILE, plot_runs

    teacher, before, after = rows3
    rows = [r for r in rows3 if r is not None]
    plots = plot_runs([train_dir], train_dir / "plots")
    table = format_table(
        rows,
        heldout,
        heldout=len(heldout),
        kl_prompts=kl_prompts,
        max_tokens=cfg.eval.max_tokens,
        steps=steps,
    )
    keyed = {"teacher": teacher, "student_before": before, "student_after": after}
    results = results_json(
        keyed,
        pair=pair,
        context=cfg.teacher.context,
        heldout=len(heldout),
        kl_prompts=kl_prompts,
        steps=steps,
        seconds=seconds,
        extra={
            "teacher_name": teacher.name if teacher else None,
            "eval_max_tokens": cfg.eval.max_tokens,
        },
    )
    md, js = write_results(run_dir, table, results)
    print("\n" + table)
    print(
        f"\nformat rate: {before.format_rate:.1%} -> {after.format_rate:.1%}"
        + (f" (teacher {teacher.format_rate:.1%})" if teacher else "")
    )
    for unit, old, new in (
        ("nats/token", before.reverse_kl, after.reverse_kl),
        ("nats/answer", before.reverse_kl_per_answer, after.reverse_kl_per_answer),
    ):
        if old is not None and new is not None:
            print(f"reverse KL to the teacher ({unit}): {_change(old, new)}")
    progress = train_dir / "plots" / EVAL_PROGRESS_FILE
    print(f"metrics: {train_dir / 'metrics.jsonl'}")
    print("plots:   " + ", ".join(str(p) for p in plots))
    if progress in plots:
        print(f"curve:   {progress}   (held-out format rate and reverse KL over the steps)")
    print(f"table:   {md}   figures: {js}   (total {seconds:.0f}s)")
