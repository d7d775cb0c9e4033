"""One step's batch from fake services (no models, no HTTP): request chunking and seeds,
ordering, which samples are trained, the rollout/* and timing metrics; the pipelined schedule
(scoring overlaps sampling, the same batch as the sequential schedule, errors, the
concurrency bound); the producer's data order, and that a weight push does not hold up
sampling."""

from __future__ import annotations

import pickle
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from services.protocol import RolloutItem, RolloutResponse, RolloutUsage
from trainer.batches import (
    Batch,
    build_sequences,
    derive_seed,
    example_samples,
    make_batch,
    rollout_metrics,
    sample_rollouts,
    score_rollouts,
)
from trainer.clients import ServiceError, TokenScores
from trainer.config import load_config
from trainer.config_sections import TeacherContextConfig
from trainer.data import Example, PromptSampler
from trainer.grading import grade
from trainer.policy import TrainSequence
from trainer.producer import BatchProducer
from trainer.teacher_context import TeacherContext
from trainer.weight_sync import WEIGHTS_FILE, WeightSync

NO_CONTEXT = TeacherContext(TeacherContextConfig(), [])


class FakeServices:
    """``rollouts`` answers 2 samples per prompt (sample 1 of prompt 1 is empty; sample 0 of
    prompt 2 is truncated), in reverse order; the teacher scores every token -1."""

    def __init__(self) -> None:
        self.seeds: list[int | None] = []
        self.sync = SimpleNamespace(version=3)
        self.teacher = SimpleNamespace(score=self._score)

    def rollouts(self, prompts, *, n, max_tokens, temperature, seed) -> RolloutResponse:
        self.seeds.append(seed)
        first = int(re.search(r"Q(\d+) \?", prompts[0]["messages"][-1]["content"]).group(1))
        items = []
        for p in range(len(prompts)):
            for k in range(n):
                tokens = [] if (first + p, k) == (1, 1) else [5, 6, 7]
                items.append(
                    RolloutItem(
                        prompt_index=p,
                        sample_index=k,
                        prompt_token_ids=[1, 2],
                        token_ids=tokens,
                        logprobs=[-0.5] * len(tokens),
                        text="The answer is 4." if k == 0 else "no idea",
                        finish_reason="length" if (first + p, k) == (2, 0) else "stop",
                        policy_version=3,
                    )
                )
        return RolloutResponse(
            model="m",
            policy_version=3,
            data=items[::-1],
            usage=RolloutUsage(prompt_tokens=0, completion_tokens=0),
        )

    def _score(self, prompts, responses, *, top_k=0, **_) -> list[TokenScores]:
        self.scored_prompts = [list(p) for p in prompts]
        out = []
        for r in responses:
            lp = np.full(len(r), -1.0, np.float32)
            if not top_k:
                out.append(TokenScores(lp))
                continue
            ids = np.tile(np.arange(top_k, dtype=np.int64), (len(r), 1))
            out.append(TokenScores(lp, ids, np.full((len(r), top_k), -3.0, np.float32)))
        return out


def _examples(n: int) -> list[Example]:
    return [
        Example(index=i, question=f"Q{i} ?", answer="#### 4", ground_truth="4") for i in range(n)
    ]


@pytest.mark.parametrize("mask_truncated", ["false", "true", "sampled_token"])
def test_make_batch_orders_grades_and_masks(mask_truncated: str) -> None:
    cfg = load_config(
        None,
        [
            "student.model=s",
            "seed=7",
            "rollout.samples_per_prompt=2",
            "rollout.prompts_per_request=2",
            f"rollout.mask_truncated={mask_truncated}",
            "algorithm.teacher_top_k=2",
            "logging.samples_per_step=2",
        ],
    )
    services = FakeServices()
    batch = make_batch(cfg, services, 5, _examples(3), {"cursor": 0}, NO_CONTEXT)  # type: ignore[arg-type]

    # One request per 2 prompts, each seeded by (seed, step, its first prompt).
    assert sorted(services.seeds) == [derive_seed(7, 5, 0), derive_seed(7, 5, 2)]
    assert len(batch.sequences) == 6 and batch.versions == [3] * 6
    # Sample 3 is empty; sample 4 is truncated: out with `true`, in the top-k term only with
    # `sampled_token`.
    trainable = [s.trainable for s in batch.sequences]
    assert trainable == [True, True, True, False, mask_truncated != "true", True]
    in_policy_loss = [s.policy_loss for s in batch.sequences]
    assert in_policy_loss == [True, True, True, True, mask_truncated == "false", True]
    np.testing.assert_array_equal(batch.sequences[0].teacher_logprobs, [-1.0, -1.0, -1.0])
    m = batch.metrics
    assert m["rollout/accuracy/mean"] == pytest.approx(0.5)  # sample 0 of each prompt
    assert m["rollout/empty_frac"] == pytest.approx(1 / 6)
    assert m["rollout/truncated_frac"] == pytest.approx(1 / 6)
    assert m["rollout/num_prompts"] == 3 and m["rollout/num_samples"] == 6
    # s - tau = -0.5 - (-1) on every sampled token, trained or masked.
    assert m["rollout/reverse_kl"] == pytest.approx(0.5)
    assert m["timing/rollout_s"] >= 0 and m["timing/score_s"] >= 0
    assert [s["prompt_index"] for s in batch.samples] == [0, 1]
    assert batch.response_tokens == 15


def test_rollout_reverse_kl_is_per_token_over_every_finite_sample() -> None:
    """``rollout/reverse_kl``: sum of ``s - tau`` over the tokens of every sample (trained or
    masked), divided by their count; samples with non-finite logprobs are left out."""
    item = RolloutItem(
        prompt_index=0,
        sample_index=0,
        prompt_token_ids=[1],
        token_ids=[5],
        logprobs=[-1.0],
        text="x",
        finish_reason="stop",
        policy_version=0,
    )
    seqs = [
        TrainSequence(
            np.array([1]), np.array([5, 6]), np.array([-1.0, -1.0]), np.array([-2.0, -3.0])
        ),
        TrainSequence(
            np.array([1]), np.array([5]), np.array([-1.0]), np.array([-1.5]), trainable=False
        ),
        TrainSequence(np.array([1]), np.array([5]), np.array([-np.inf]), np.array([-1.0])),
    ]
    rollouts = [
        SimpleNamespace(response_ids=s.response_ids, prompt_ids=s.prompt_ids, item=item)
        for s in seqs
    ]
    m = rollout_metrics(rollouts, [grade("x", "1")] * 3, seqs, 1)  # type: ignore[arg-type]
    assert m["rollout/reverse_kl"] == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert m["rollout/nonfinite_frac"] == pytest.approx(1 / 3)


def test_producer_draws_prompts_in_step_order() -> None:
    cfg = load_config(None, ["student.model=s", "rollout.prompts_per_step=2"])
    sampler = PromptSampler(_examples(4), seed=0, shuffle=False, max_epochs=1)
    producer = BatchProducer(cfg, FakeServices(), sampler, 5, 0, NO_CONTEXT)  # type: ignore[arg-type]
    first = producer.get(1)
    assert first is not None and first.step == 1
    assert producer.get(2) is not None
    assert producer.get(3) is None  # 4 prompts, 2 per step, one epoch


class FakeTokenizer:
    """Chat template: every message becomes [len(content)], the generation prompt [0]."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return [len(m["content"]) for m in messages] + ([0] if add_generation_prompt else [])


def test_teacher_context_prompts_and_top_k_reach_the_sequences() -> None:
    cfg = load_config(
        None,
        [
            "student.model=s",
            "rollout.samples_per_prompt=2",
            "algorithm.teacher_top_k=3",
            "teacher.context.system=Teacher only.",
        ],
    )
    context = TeacherContext(cfg.teacher.context, [], FakeTokenizer())
    services = FakeServices()
    batch = make_batch(cfg, services, 1, _examples(2), {}, context)  # type: ignore[arg-type]
    # The teacher sees its own prompt (its system prompt, then the user turn), not [1, 2].
    want = context.prompt_ids(_examples(2)[0], [1, 2])
    assert want[0] == len("Teacher only.") and want[-1] == 0
    assert services.scored_prompts[0] == want
    seq = batch.sequences[0]
    assert seq.teacher_top_ids is not None and seq.teacher_top_ids.shape == (3, 3)
    np.testing.assert_array_equal(seq.teacher_top_logprobs, np.full((3, 3), -3.0))


# --------------------------------------------------------------------------------- pipeline


class RecordingServices:
    """Fake services for the pipelined schedule. Prompt ``j``'s sample ``k`` has
    ``(j + k) % 4`` tokens (some empty) and prompt ids ``[1000 + j]``; the teacher's scores
    depend on the tokens. Records each request's start and end (``events``) and the most
    requests in flight per service; ``on_rollout(first_prompt)`` and ``on_score(prompts)``
    run inside a request (events, barriers, errors)."""

    def __init__(self) -> None:
        self.sync = SimpleNamespace(version=2)
        self.teacher = SimpleNamespace(score=self._score)
        self.seeds: list[int | None] = []
        self.events: list[tuple[str, int, str, float]] = []
        self.in_flight = {"rollout": 0, "score": 0}
        self.max_in_flight = {"rollout": 0, "score": 0}
        self.on_rollout: Callable[[int], None] = lambda first: None
        self.on_score: Callable[[list[int]], None] = lambda prompts: None
        self._lock = threading.Lock()

    def _enter(self, service: str, first: int) -> None:
        with self._lock:
            self.in_flight[service] += 1
            self.max_in_flight[service] = max(self.max_in_flight[service], self.in_flight[service])
            self.events.append((service, first, "start", time.monotonic()))

    def _exit(self, service: str, first: int) -> None:
        with self._lock:
            self.in_flight[service] -= 1
            self.events.append((service, first, "end", time.monotonic()))

    def rollouts(self, prompts, *, n, max_tokens, temperature, seed) -> RolloutResponse:
        first = int(re.search(r"Q(\d+) \?", prompts[0]["messages"][-1]["content"]).group(1))
        self._enter("rollout", first)
        try:
            self.on_rollout(first)
            with self._lock:
                self.seeds.append(seed)
            items = []
            for p in range(len(prompts)):
                j = first + p
                for k in range(n):
                    tokens = list(range(10 * j + k, 10 * j + k + (j + k) % 4))
                    items.append(
                        RolloutItem(
                            prompt_index=p,
                            sample_index=k,
                            prompt_token_ids=[1000 + j],
                            token_ids=tokens,
                            logprobs=[-0.1 * (t + 1) for t in tokens],
                            text="The answer is 4." if (j + k) % 2 == 0 else "no idea",
                            finish_reason="length" if (j + k) % 5 == 0 else "stop",
                            policy_version=2 - (j % 2),
                        )
                    )
            return RolloutResponse(
                model="m",
                policy_version=2,
                data=items[::-1],
                usage=RolloutUsage(prompt_tokens=0, completion_tokens=0),
            )
        finally:
            self._exit("rollout", first)

    def _score(self, prompts, responses, *, top_k=0, **_) -> list[TokenScores]:
        indices = [int(p[0]) - 1000 for p in prompts]
        self._enter("score", min(indices, default=-1))
        try:
            self.on_score(indices)
            out = []
            for p, r in zip(prompts, responses, strict=True):
                lp = np.array([-(int(t) % 7) / 7 - 0.01 * p[0] for t in r], np.float32)
                if not top_k:
                    out.append(TokenScores(lp))
                    continue
                ids = np.array([[int(t) + i for i in range(top_k)] for t in r], np.int64)
                out.append(TokenScores(lp, ids.reshape(-1, top_k), np.tile(lp[:, None], top_k)))
            return out
        finally:
            self._exit("score", min(indices, default=-1))


def _sequential_batch(cfg, services, step, examples, state, context) -> Batch:
    """The schedule before pipelining: every rollout, then every score, then the grades."""
    rollouts = sample_rollouts(cfg, services, step, examples)
    scores = score_rollouts(cfg, services.teacher, rollouts, examples, context)
    grades = [grade(x.item.text, examples[x.prompt_index].ground_truth) for x in rollouts]
    sequences = build_sequences(cfg, rollouts, scores)
    return Batch(
        step=step,
        sequences=sequences,
        sampler_state=state,
        versions=[x.item.policy_version for x in rollouts],
        metrics=rollout_metrics(rollouts, grades, sequences, len(examples)),
        samples=example_samples(cfg, examples, rollouts, grades),
    )


def _pipeline_cfg(*overrides: str):
    return load_config(None, ["student.model=s", "seed=3", *overrides])


def test_scoring_starts_before_the_last_rollout_chunk_returns() -> None:
    cfg = _pipeline_cfg("rollout.prompts_per_request=1", "rollout.samples_per_prompt=2")
    services = RecordingServices()
    scored = threading.Event()
    waited: list[bool] = []
    # The last chunk is the slow one: it returns only once some chunk is being scored (a
    # schedule that scores after sampling would wait out the timeout here).
    services.on_rollout = lambda first: waited.append(scored.wait(5)) if first == 2 else None
    services.on_score = lambda prompts: scored.set()
    batch = make_batch(cfg, services, 1, _examples(3), {}, NO_CONTEXT)  # type: ignore[arg-type]

    assert waited == [True]
    first_score = min(t for s, _, what, t in services.events if (s, what) == ("score", "start"))
    last_rollout = max(t for s, _, what, t in services.events if (s, what) == ("rollout", "end"))
    assert first_score < last_rollout
    assert len(batch.sequences) == 6
    assert batch.metrics["timing/rollout_s"] >= 0 and batch.metrics["timing/score_s"] >= 0


def test_pipelined_batch_is_the_sequential_one() -> None:
    cfg = _pipeline_cfg(
        "rollout.samples_per_prompt=3",
        "rollout.prompts_per_request=2",  # chunks of 6 samples (the last one of 3)
        "teacher.sequences_per_request=4",  # so a chunk's scoring is 2 requests
        "algorithm.teacher_top_k=2",
        "logging.samples_per_step=3",
        "services.max_concurrency=3",
    )
    examples = _examples(7)
    services, reference = RecordingServices(), RecordingServices()
    got = make_batch(cfg, services, 4, examples, {"cursor": 9}, NO_CONTEXT)  # type: ignore[arg-type]
    want = _sequential_batch(cfg, reference, 4, examples, {"cursor": 9}, NO_CONTEXT)

    assert sorted(services.seeds) == sorted(reference.seeds)
    assert [k for k in got.metrics if k.startswith("timing/")] == [
        "timing/rollout_s",
        "timing/score_s",
    ]
    got.metrics = {k: v for k, v in got.metrics.items() if not k.startswith("timing/")}
    assert got.metrics == want.metrics
    assert pickle.dumps(got) == pickle.dumps(want)  # sequences, order, dtypes, every field
    assert [(len(s.response_ids), s.trainable) for s in got.sequences][:4] == [
        (0, False),  # prompt 0 sample 0: empty
        (1, True),
        (2, True),
        (1, True),
    ]


@pytest.mark.parametrize("where", ["score", "rollout"])
def test_an_error_in_one_chunk_is_raised(where: str) -> None:
    cfg = _pipeline_cfg("rollout.prompts_per_request=1", "rollout.samples_per_prompt=2")
    services = RecordingServices()

    def fail(first: int) -> None:
        if first == 1:
            raise ServiceError("teacher" if where == "score" else "rollout", "POST", "u", 400, "no")

    if where == "score":
        services.on_score = lambda prompts: fail(prompts[0])
    else:
        services.on_rollout = fail
    with pytest.raises(ServiceError, match="no"):
        make_batch(cfg, services, 1, _examples(4), {}, NO_CONTEXT)  # type: ignore[arg-type]
    assert services.in_flight == {"rollout": 0, "score": 0}  # nothing left running


def test_requests_in_flight_stay_within_max_concurrency() -> None:
    cfg = _pipeline_cfg(
        "rollout.prompts_per_request=1",
        "rollout.samples_per_prompt=2",
        "services.max_concurrency=2",
    )
    services = RecordingServices()
    # Each service waits for 2 requests at once: the bound is reached, and a third would show.
    rollouts, scores = threading.Barrier(2, timeout=5), threading.Barrier(2, timeout=5)
    services.on_rollout = lambda first: rollouts.wait()
    services.on_score = lambda prompts: scores.wait()
    batch = make_batch(cfg, services, 1, _examples(6), {}, NO_CONTEXT)  # type: ignore[arg-type]
    assert len(batch.sequences) == 12
    assert services.max_in_flight == {"rollout": 2, "score": 2}


def test_a_rollout_answer_does_not_wait_for_a_weight_push(tmp_path: Path) -> None:
    """Every rollout answer passes WeightSync.restore; during a push (which holds the sync
    lock while it writes and sends the weights) one at the current version must not wait."""
    replica = SimpleNamespace(base_url="http://rollout", upload_weights=lambda file, version: None)
    sync = WeightSync(replica, method="upload", staging_dir=tmp_path)  # type: ignore[arg-type]
    writing, release = threading.Event(), threading.Event()

    def write(directory: Path) -> None:
        writing.set()
        release.wait(5)
        (directory / WEIGHTS_FILE).write_bytes(b"weights")

    pusher = threading.Thread(target=sync.push, args=(write,))
    pusher.start()
    try:
        assert writing.wait(5)
        started = time.monotonic()
        assert not sync.restore(served_version=0, expected_min=0)
        assert time.monotonic() - started < 1
    finally:
        release.set()
        pusher.join(5)
    assert sync.version == 1
