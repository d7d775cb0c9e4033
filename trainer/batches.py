"""One step's training data: sample, score, grade (rank 0), and the producer that runs ahead.

:func:`make_batch` is the data half of a step. It is a pipeline over the step's rollout chunks
(one ``POST /v1/rollouts`` per ``rollout.prompts_per_request`` prompts)::

    for each chunk, up to services.max_concurrency at once:   # sample_score_grade
        rollouts = sample_chunk(...)     # POST /v1/rollouts
        scorer  <- score_rollouts(...)   # POST /v1/score of exactly those tokens, after the
                                         # teacher's prompt; up to max_concurrency requests
        grader  <- grade_rollouts(...)   # one thread; grades are metrics only
    batch = assemble_batch(...)          # ordered by (prompt, sample)

So the teacher scores chunk ``i`` while the student still samples the later chunks, and
grading never holds up a request. Rollout and score requests are each bounded by
``services.max_concurrency`` (per batch). The batch is the one the sequential schedule
(:func:`sample_rollouts`, then :func:`score_rollouts`, then grading) builds: the same
rollout requests and seeds, order and scores; score requests are grouped by chunk rather
than across chunks, and the times differ. ``timing/rollout_s`` is the wall time until the
last rollout chunk returned, ``timing/score_s`` what scoring (and grading) still took after
that; their sum is the batch's wall time. The first error (in chunk order) is raised; work
not started yet is dropped, and a scoring error is seen once every rollout has returned.

Each request's seed is fixed by ``(seed, step, first prompt)``, so a resumed run samples the
same tokens. :class:`trainer.producer.BatchProducer` decides when each step's batch is made.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np

from services.protocol import RolloutItem
from trainer.clients import TeacherClient, TokenScores, map_concurrently, rollout_item_arrays
from trainer.config import TrainConfig
from trainer.connections import Services
from trainer.data import Example, build_messages
from trainer.grading import Grade, grade, is_degenerate
from trainer.policy import TrainSequence
from trainer.teacher_context import TeacherContext
from trainer.timing import timed

__all__ = [
    "Batch",
    "ChunkWork",
    "Rollout",
    "assemble_batch",
    "build_sequences",
    "chunk_starts",
    "derive_seed",
    "grade_rollouts",
    "make_batch",
    "rollout_metrics",
    "sample_chunk",
    "sample_rollouts",
    "sample_score_grade",
    "score_rollouts",
]

log = logging.getLogger("opd.trainer")

T = TypeVar("T")


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers, e.g. ``(run seed, step, prompt index)``: the same
    request gets the same samples on every run (resume determinism)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Rollout:
    """One sampled trajectory: its prompt's index in the step, the service's item, and its
    token arrays (``logprobs`` is ``s``, the logprob under the weights that sampled it)."""

    prompt_index: int
    item: RolloutItem
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray


@dataclass
class Batch:
    """One step's training data, plus what the metrics need."""

    step: int
    sequences: list[TrainSequence]
    sampler_state: dict[str, Any]  # sampler position before this batch was drawn
    versions: list[int] = field(default_factory=list)  # policy_version of each sample
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few, for samples.jsonl

    @property
    def response_tokens(self) -> int:
        """Sampled tokens in the batch (trained or not): the throughput numerator."""
        return sum(len(s.response_ids) for s in self.sequences)


# --------------------------------------------------------------------------------- one batch


def _order(x: Rollout) -> tuple[int, int]:
    return x.prompt_index, x.item.sample_index


def chunk_starts(cfg: TrainConfig, examples: Sequence[Example]) -> list[int]:
    """The first prompt of each rollout request: one per ``rollout.prompts_per_request``."""
    return list(range(0, len(examples), cfg.rollout.prompts_per_request))


def sample_chunk(
    cfg: TrainConfig, services: Services, step: int, examples: Sequence[Example], start: int
) -> list[Rollout]:
    """One ``POST /v1/rollouts``: ``rollout.samples_per_prompt`` samples of the
    ``rollout.prompts_per_request`` prompts from ``start``, seeded by ``(seed, step, start)``,
    ordered by (prompt, sample)."""
    r = cfg.rollout
    chunk = examples[start : start + r.prompts_per_request]
    resp = services.rollouts(
        [{"messages": build_messages(ex.question)} for ex in chunk],
        n=r.samples_per_prompt,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        seed=derive_seed(cfg.seed, step, start),
    )
    rollouts = [Rollout(start + it.prompt_index, it, *rollout_item_arrays(it)) for it in resp.data]
    return sorted(rollouts, key=_order)


def sample_rollouts(
    cfg: TrainConfig, services: Services, step: int, examples: Sequence[Example]
) -> list[Rollout]:
    """``rollout.samples_per_prompt`` samples of every prompt, ordered by (prompt, sample).

    One request per ``rollout.prompts_per_request`` prompts, up to
    ``services.max_concurrency`` at once, all returned together: the sequential schedule's
    first half (:func:`make_batch` scores each chunk as it returns instead).
    """

    def sample(start: int) -> list[Rollout]:
        return sample_chunk(cfg, services, step, examples, start)

    parts = map_concurrently(sample, chunk_starts(cfg, examples), cfg.services.max_concurrency)
    return sorted((x for part in parts for x in part), key=_order)


def score_rollouts(
    cfg: TrainConfig,
    teacher: TeacherClient,
    rollouts: Sequence[Rollout],
    examples: Sequence[Example],
    context: TeacherContext,
) -> list[TokenScores]:
    """The teacher's scores of every sampled token (and its top-k with
    ``algorithm.teacher_top_k``), each response after the teacher's prompt for its problem."""
    return teacher.score(
        [context.prompt_ids(examples[x.prompt_index], x.prompt_ids) for x in rollouts],
        [x.response_ids for x in rollouts],
        temperature=cfg.teacher_temperature,
        top_k=cfg.algorithm.teacher_top_k,
        sequences_per_request=cfg.teacher.sequences_per_request,
        max_concurrency=cfg.services.max_concurrency,
    )


def grade_rollouts(rollouts: Sequence[Rollout], examples: Sequence[Example]) -> list[Grade]:
    """Each response graded against its problem's ground truth (a metric, never a reward)."""
    return [grade(x.item.text, examples[x.prompt_index].ground_truth) for x in rollouts]


@dataclass
class ChunkWork:
    """One sampled chunk and the work it started: its score requests (in rollout order, one
    per ``teacher.sequences_per_request`` samples) and its grading."""

    rollouts: list[Rollout]
    scores: list[Future[list[TokenScores]]]
    grades: Future[list[Grade]]


def sample_score_grade(
    cfg: TrainConfig,
    services: Services,
    step: int,
    examples: Sequence[Example],
    start: int,
    context: TeacherContext,
    scorer: Executor,
    grader: Executor,
) -> ChunkWork:
    """One chunk: sample it, then hand its scoring to ``scorer`` and its grading to ``grader``
    and return, so this thread can send the next rollout request while those run."""
    rollouts = sample_chunk(cfg, services, step, examples, start)
    size = cfg.teacher.sequences_per_request
    # Requests of at most sequences_per_request each: one task is one /v1/score request, so
    # the scorer's worker count is the bound on requests in flight.
    scores = [
        scorer.submit(score_rollouts, cfg, services.teacher, part, examples, context)
        for part in (rollouts[k : k + size] for k in range(0, len(rollouts), size))
    ]
    return ChunkWork(rollouts, scores, grader.submit(grade_rollouts, rollouts, examples))


def build_sequences(
    cfg: TrainConfig, rollouts: Sequence[Rollout], scores: Sequence[TokenScores]
) -> list[TrainSequence]:
    """One :class:`TrainSequence` per rollout. Left out of the loss (``trainable=False``):
    empty responses, non-finite logprobs, and truncated ones with ``rollout.mask_truncated:
    true``; with ``mask_truncated: sampled_token`` (and the teacher's top-k in the batch) a
    truncated one stays in the top-k term only (``policy_loss=False``)."""
    mode = cfg.rollout.mask_truncated
    out = []
    for x, sc in zip(rollouts, scores, strict=True):
        t = sc.logprobs
        finite = bool(np.isfinite(x.logprobs).all() and np.isfinite(t).all())
        truncated = bool(mode) and x.item.finish_reason == "length"
        usable = len(x.response_ids) > 0 and finite
        out.append(
            TrainSequence(
                x.prompt_ids,
                x.response_ids,
                x.logprobs,
                t,
                trainable=usable and (not truncated or mode == "sampled_token"),
                policy_loss=not truncated,
                teacher_top_ids=sc.top_ids,
                teacher_top_logprobs=sc.top_logprobs,
            )
        )
    return out


def rollout_metrics(
    rollouts: Sequence[Rollout],
    grades: Sequence[Grade],
    sequences: Sequence[TrainSequence],
    num_prompts: int,
) -> dict[str, float]:
    """The ``rollout/*`` scalars of a batch (grades are metrics, never rewards)."""
    n = max(len(rollouts), 1)
    lengths = [len(x.response_ids) for x in rollouts]
    finite = [
        s
        for s in sequences
        if np.isfinite(s.behaviour_logprobs).all() and np.isfinite(s.teacher_logprobs).all()
    ]
    nonfinite = len(sequences) - len(finite)
    # Over every sampled token, trained or not: the step's on-policy estimate of the
    # held-out eval/reverse_kl (rollout/kl_divergence/mean covers the trained ones only).
    kl_tokens = sum(len(s.response_ids) for s in finite)
    kl_sum = sum(float(np.sum(s.behaviour_logprobs - s.teacher_logprobs)) for s in finite)
    return {
        "rollout/accuracy/mean": sum(g.correct for g in grades) / n,
        "rollout/format_rate": sum(g.formatted for g in grades) / n,
        "rollout/answer_rate": sum(g.has_answer for g in grades) / n,
        "rollout/degenerate_frac": sum(is_degenerate(x.item.text) for x in rollouts) / n,
        "rollout/response_length/mean": sum(lengths) / n,
        "rollout/response_length/max": float(max(lengths, default=0)),
        "rollout/prompt_length/mean": sum(len(x.prompt_ids) for x in rollouts) / n,
        "rollout/truncated_frac": sum(x.item.finish_reason == "length" for x in rollouts) / n,
        "rollout/empty_frac": sum(length == 0 for length in lengths) / n,
        "rollout/nonfinite_frac": nonfinite / n,
        "rollout/reverse_kl": kl_sum / kl_tokens if kl_tokens else 0.0,
        "rollout/num_prompts": float(num_prompts),
        "rollout/num_samples": float(len(rollouts)),
    }


def example_samples(
    cfg: TrainConfig,
    examples: Sequence[Example],
    rollouts: Sequence[Rollout],
    grades: Sequence[Grade],
) -> list[dict[str, Any]]:
    """The first sample of the first ``logging.samples_per_step`` prompts, for samples.jsonl."""
    out: list[dict[str, Any]] = []
    for x, g in zip(rollouts, grades, strict=True):
        if len(out) >= cfg.logging.samples_per_step:
            break
        if x.item.sample_index != 0:
            continue
        ex = examples[x.prompt_index]
        out.append(
            {
                "prompt_index": x.prompt_index,
                "question": ex.question,
                "ground_truth": ex.ground_truth,
                "response": x.item.text,
                "correct": g.correct,
                "finish_reason": x.item.finish_reason,
                "policy_version": x.item.policy_version,
            }
        )
    return out


def assemble_batch(
    cfg: TrainConfig,
    step: int,
    examples: Sequence[Example],
    sampler_state: dict[str, Any],
    rollouts: Sequence[Rollout],
    scores: Sequence[TokenScores],
    grades: Sequence[Grade],
    timing: dict[str, float],
) -> Batch:
    """The :class:`Batch` of sampled, scored and graded rollouts (ordered by prompt, sample)."""
    sequences = build_sequences(cfg, rollouts, scores)
    metrics = rollout_metrics(rollouts, grades, sequences, len(examples)) | timing
    if metrics["rollout/nonfinite_frac"] > 0:
        log.warning(
            "step %d: %d sample(s) with non-finite logprobs left out of the loss",
            step,
            round(metrics["rollout/nonfinite_frac"] * len(rollouts)),
        )
    return Batch(
        step=step,
        sequences=sequences,
        sampler_state=sampler_state,
        versions=[x.item.policy_version for x in rollouts],
        metrics=metrics,
        samples=example_samples(cfg, examples, rollouts, grades),
    )


@contextmanager
def _executor(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A thread pool that, when the block fails, drops its queued tasks (the batch is lost)
    and waits only for the running ones."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _results(futures: Sequence[Future[T]]) -> list[T]:
    """The results in order. At the first failure the tasks not started yet are cancelled and,
    once the running ones are done, the first error in order is raised."""
    wait(futures, return_when=FIRST_EXCEPTION)
    if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
        for f in futures:
            f.cancel()
        wait(futures)
        next(f for f in futures if not f.cancelled() and f.exception() is not None).result()
    return [f.result() for f in futures]


def make_batch(
    cfg: TrainConfig,
    services: Services,
    step: int,
    examples: Sequence[Example],
    sampler_state: dict[str, Any],
    context: TeacherContext,
) -> Batch:
    """Sample, score and grade one step's prompts, pipelined by chunk (module docstring;
    rank 0; may run in a background thread)."""
    limit = cfg.services.max_concurrency
    starts = chunk_starts(cfg, examples)
    timing: dict[str, float] = {}
    # Exits in reverse order: the rollout workers finish handing work to the others first.
    with (
        _executor(limit, "opd-score") as scorer,
        _executor(1, "opd-grade") as grader,
        _executor(min(limit, len(starts)), "opd-rollout") as sampler,
    ):
        one = partial(
            sample_score_grade,
            cfg,
            services,
            step,
            examples,
            context=context,
            scorer=scorer,
            grader=grader,
        )
        with timed("rollout", timing):
            chunks = _results([sampler.submit(one, start) for start in starts])
        with timed("score", timing):
            scores = _results([part for c in chunks for part in c.scores])
            grades = _results([c.grades for c in chunks])
    scored = zip(
        (x for c in chunks for x in c.rollouts),
        (s for part in scores for s in part),
        (g for part in grades for g in part),
        strict=True,
    )
    # Chunks cover increasing prompt ranges, so this sort is a check more than a reorder.
    ordered = sorted(scored, key=lambda t: _order(t[0]))
    return assemble_batch(
        cfg,
        step,
        examples,
        sampler_state,
        [x for x, _, _ in ordered],
        [s for _, s, _ in ordered],
        [g for _, _, g in ordered],
        timing,
    )
