"""GSM8K evaluation: greedy answers, graded (eval/accuracy, eval/format_rate, ...).

The same code grades three kinds of model:

* the student during training, through the rollout service's ``/v1/rollouts`` (greedy);
* any OpenAI-compatible endpoint (``opd eval --model http://host:8001``, e.g. the teacher),
  through ``/v1/chat/completions`` at temperature 0;
* a checkpoint directory (``opd eval --model runs/x/checkpoints/step-000078/model``): a
  temporary rollout service is started on it (hf backend by default) and used as above.

``measure_reverse_kl`` is the distillation metric: sample from the student, score with the
teacher, sum ``s - tau`` (a single-sample estimate of KL(student || teacher)), reported per
token and per answer. The two can move apart: the per-token figure is divided by the answers'
length, so answers that get shorter can raise it while the per-answer one falls, and a
student that repeats itself lowers it (inside a loop both models predict the next line alike).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.launch import running_service
from services.protocol import RolloutResponse
from trainer.clients import (
    RolloutClient,
    ServiceClient,
    TeacherClient,
    map_concurrently,
    rollout_item_arrays,
)
from trainer.data import Example, build_messages, load_gsm8k
from trainer.grading import grade, is_degenerate
from trainer.retry import RetryPolicy
from trainer.teacher_context import TeacherContext

__all__ = [
    "EvalResult",
    "Generate",
    "KLSample",
    "ReverseKL",
    "RolloutFn",
    "chat_completions_generator",
    "eval_main",
    "evaluate",
    "measure_reverse_kl",
    "rollout_generator",
    "sample_reverse_kl",
    "temporary_rollout_service",
]

log = logging.getLogger("opd.trainer.eval")

#: ``rollout_fn(prompts, n=, max_tokens=, temperature=, seed=) -> RolloutResponse``
RolloutFn = Callable[..., RolloutResponse]
#: ``generate(list of chat messages, max_tokens) -> [(text, completion tokens)]``, greedy.
Generate = Callable[[Sequence[list[dict[str, str]]], int], list[tuple[str, int]]]


@dataclass
class EvalResult:
    """Graded greedy answers of a set of problems.

    ``format_rate`` counts answers in the requested format (a final ``\\boxed{}``);
    ``answer_rate`` answers that state one (boxed, ``####`` or "the answer is");
    ``accuracy`` counts correct answers in whatever form they were given;
    ``degenerate_frac`` blank, one-unit-repeated or looping answers
    (:func:`trainer.grading.is_degenerate`).
    """

    accuracy: float
    format_rate: float
    n: int
    mean_response_tokens: float
    records: list[dict[str, Any]] = field(default_factory=list)
    answer_rate: float = 0.0
    degenerate_frac: float = 0.0

    def metrics(self) -> dict[str, float]:
        """The logged scalars."""
        return {
            "eval/accuracy": self.accuracy,
            "eval/format_rate": self.format_rate,
            "eval/answer_rate": self.answer_rate,
            "eval/degenerate_frac": self.degenerate_frac,
            "eval/response_length/mean": self.mean_response_tokens,
            "eval/num_problems": float(self.n),
        }


def evaluate(
    generate: Generate,
    examples: Sequence[Example],
    max_tokens: int,
    *,
    messages_for: Callable[[Example], list[dict[str, str]]] | None = None,
) -> EvalResult:
    """Answer every problem greedily with ``generate`` and grade the answers.

    ``messages_for(example)`` is the chat each problem is asked as (default: the math prompt,
    ``build_messages(example.question)``); e.g. a teacher's own context
    (:meth:`trainer.teacher_context.TeacherContext.messages`).
    """

    def ask(ex: Example) -> list[dict[str, str]]:
        return messages_for(ex) if messages_for is not None else build_messages(ex.question)

    answers = generate([ask(ex) for ex in examples], max_tokens)
    records = []
    for ex, (text, n_tokens) in zip(examples, answers, strict=True):
        g = grade(text, ex.ground_truth)
        records.append(
            {
                "index": ex.index,
                "ground_truth": ex.ground_truth,
                "extracted": g.extracted,
                "correct": g.correct,
                "formatted": g.formatted,
                "has_answer": g.has_answer,
                "degenerate": is_degenerate(text),
                "response_tokens": n_tokens,
                "response": text,
            }
        )
    n = len(records)

    def share(key: str) -> float:
        return sum(r[key] for r in records) / n if n else 0.0

    return EvalResult(
        accuracy=share("correct"),
        format_rate=share("formatted"),
        n=n,
        mean_response_tokens=share("response_tokens"),
        records=records,
        answer_rate=share("has_answer"),
        degenerate_frac=share("degenerate"),
    )


def rollout_generator(
    rollout_fn: RolloutFn, *, prompts_per_request: int, max_concurrency: int
) -> Generate:
    """Greedy answers through ``/v1/rollouts`` (temperature 0, n = 1)."""

    def generate(
        messages: Sequence[list[dict[str, str]]], max_tokens: int
    ) -> list[tuple[str, int]]:
        chunks = [
            list(messages[i : i + prompts_per_request])
            for i in range(0, len(messages), prompts_per_request)
        ]

        def one(chunk: list[list[dict[str, str]]]) -> list[tuple[str, int]]:
            resp = rollout_fn(
                [{"messages": m} for m in chunk],
                n=1,
                max_tokens=max_tokens,
                temperature=0.0,
                seed=0,
            )
            items = sorted(resp.data, key=lambda it: (it.prompt_index, it.sample_index))
            return [(it.text, len(rollout_item_arrays(it)[1])) for it in items]

        return [a for part in map_concurrently(one, chunks, max_concurrency) for a in part]

    return generate


def chat_completions_generator(
    client: ServiceClient, model: str, *, max_concurrency: int
) -> Generate:
    """Greedy answers through an OpenAI-compatible ``/v1/chat/completions``."""

    def one(args: tuple[list[dict[str, str]], int]) -> tuple[str, int]:
        messages, max_tokens = args
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        answer = client.post_json("/v1/chat/completions", body)
        text = answer["choices"][0]["message"].get("content") or ""
        tokens = int((answer.get("usage") or {}).get("completion_tokens", 0))
        return text, tokens

    def generate(
        messages: Sequence[list[dict[str, str]]], max_tokens: int
    ) -> list[tuple[str, int]]:
        return map_concurrently(one, [(m, max_tokens) for m in messages], max_concurrency)

    return generate


@dataclass(frozen=True)
class ReverseKL:
    """A held-out reverse-KL estimate: ``sum(s - tau)`` over the sampled answers' tokens,
    divided by their tokens (``per_token``, nats/token) and by the answers (``per_answer``,
    nats/answer: the KL between the two models' answer distributions, up to the token limit)."""

    per_token: float
    per_answer: float

    @classmethod
    def of(cls, diffs: Sequence[np.ndarray]) -> ReverseKL:
        """The estimate from each answer's per-token ``s - tau`` (an empty answer counts)."""
        total = sum(float(np.sum(d)) for d in diffs)
        tokens = sum(len(d) for d in diffs)
        return cls(
            per_token=total / tokens if tokens else 0.0,
            per_answer=total / len(diffs) if diffs else 0.0,
        )

    def metrics(self) -> dict[str, float]:
        """The logged scalars."""
        return {"eval/reverse_kl": self.per_token, "eval/reverse_kl_per_answer": self.per_answer}


@dataclass
class KLSample:
    """One sampled answer: its token ids and ``s - tau`` at each of them."""

    token_ids: np.ndarray
    diffs: np.ndarray


def sample_reverse_kl(
    rollout_fn: RolloutFn,
    teacher: TeacherClient,
    examples: Sequence[Example],
    *,
    samples_per_prompt: int,
    max_tokens: int,
    temperature: float,
    teacher_temperature: float | None = None,
    teacher_context: TeacherContext | None = None,
    seed: int = 0,
) -> list[KLSample]:
    """Sample ``samples_per_prompt`` answers to each of ``examples`` from the student and
    score them with the teacher: ``s - tau`` per token of every answer.

    ``teacher_context``: the teacher scores the samples after its own prompt, as in training.
    """
    resp = rollout_fn(
        [{"messages": build_messages(ex.question)} for ex in examples],
        n=samples_per_prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
    )
    arrays = [rollout_item_arrays(it) for it in resp.data]
    prompts = [
        teacher_context.prompt_ids(examples[it.prompt_index], a[0]) if teacher_context else a[0]
        for it, a in zip(resp.data, arrays, strict=True)
    ]
    scores = teacher.score(
        prompts, [a[1] for a in arrays], temperature=teacher_temperature or temperature
    )
    return [
        KLSample(token_ids=a[1], diffs=a[2].astype(np.float64) - t.logprobs)
        for a, t in zip(arrays, scores, strict=True)
    ]


def measure_reverse_kl(
    rollout_fn: RolloutFn, teacher: TeacherClient, examples: Sequence[Example], **sampling: Any
) -> ReverseKL:
    """``s - tau`` summed over student samples on ``examples``, per token and per answer.

    ``sampling``: the keyword arguments of :func:`sample_reverse_kl`. With a fixed ``seed``
    the same prompts are sampled the same way before and after training, so the two numbers
    differ only through the weights.
    """
    samples = sample_reverse_kl(rollout_fn, teacher, examples, **sampling)
    return ReverseKL.of([x.diffs for x in samples])


# --------------------------------------------------------------------------------- opd eval


@contextlib.contextmanager
def temporary_rollout_service(
    model: str,
    *,
    backend: str = "hf",
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 900.0,
) -> Iterator[RolloutClient]:
    """A rollout service subprocess on ``model`` for the duration of the ``with`` block.

    Raises:
        ServiceStartError: it exited or failed to load (the message ends with its log).
        TimeoutError: it was not ready after ``ready_timeout_s`` seconds.
    """
    args = ["--model", model, "--backend", backend, *extra_args]
    with running_service(
        "services.student_rollout",
        args,
        name="temporary rollout service",
        ready_timeout_s=ready_timeout_s,
    ) as service:
        client = RolloutClient(
            "rollout", service.base_url, retry=RetryPolicy(max_attempts=5, deadline_s=60)
        )
        try:
            yield client
        finally:
            client.close()


def _parse_eval_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd eval",
        description="GSM8K test accuracy (greedy) of an OpenAI-compatible endpoint or a checkpoint.",
    )
    p.add_argument(
        "--model", required=True, help="http(s) URL of a service, or a checkpoint path / hub id"
    )
    p.add_argument(
        "--served-model",
        default=None,
        help="model name to request (URL); default: the first of /v1/models",
    )
    p.add_argument(
        "--data",
        default=None,
        help="GSM8K dir/file, hub id or 'bundled' (see trainer.data); default: "
        "$OPD_DATA_DIR, then the hub",
    )
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=None, help="first N problems (default: all)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument(
        "--prompts-per-request",
        type=int,
        default=32,
        help="checkpoint mode: prompts per /v1/rollouts",
    )
    p.add_argument(
        "--backend", default="hf", choices=["hf", "vllm"], help="checkpoint mode: engine backend"
    )
    p.add_argument(
        "--api-key-env", default="OPD_API_KEY", help="env var with the endpoint's API key"
    )
    p.add_argument(
        "--output", default=None, help="directory for eval_results.json and eval_samples.jsonl"
    )
    return p.parse_args(list(argv))


def eval_main(argv: Sequence[str]) -> int:
    """``opd eval``: print (and optionally save) accuracy and format rate."""
    args = _parse_eval_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    examples = load_gsm8k(args.split, args.data, limit=args.limit)
    api_key = os.environ.get(args.api_key_env) or None
    start = time.monotonic()
    if args.model.startswith(("http://", "https://")):
        client = ServiceClient(
            "endpoint", args.model, api_key=api_key, max_connections=args.concurrency
        )
        try:
            model = args.served_model or client.get_json("/v1/models")["data"][0]["id"]
            result = evaluate(
                chat_completions_generator(client, model, max_concurrency=args.concurrency),
                examples,
                args.max_tokens,
            )
        finally:
            client.close()
    else:
        with temporary_rollout_service(args.model, backend=args.backend) as rollout:
            result = evaluate(
                rollout_generator(
                    rollout.rollouts,
                    prompts_per_request=args.prompts_per_request,
                    max_concurrency=args.concurrency,
                ),
                examples,
                args.max_tokens,
            )
    summary = {
        "model": args.model,
        "split": args.split,
        **result.metrics(),
        "seconds": round(time.monotonic() - start, 2),
    }
    print(json.dumps(summary, indent=1))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(summary, indent=1))
        with open(out / "eval_samples.jsonl", "w", encoding="utf-8") as fh:
            for record in result.records:
                fh.write(json.dumps(record) + "\n")
    return 0
