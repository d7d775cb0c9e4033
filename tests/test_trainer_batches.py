"""One step's batch from fake services (no models, no HTTP): request chunking and seeds,
ordering, which samples are trained, the rollout/* and timing metrics; the producer's data
order."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from services.protocol import RolloutItem, RolloutResponse, RolloutUsage
from trainer.batches import BatchProducer, derive_seed, make_batch
from trainer.clients import TokenScores
from trainer.config import load_config
from trainer.config_sections import TeacherContextConfig
from trainer.data import Example, PromptSampler
from trainer.teacher_context import TeacherContext

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


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_make_batch_orders_grades_and_masks(mask_truncated: bool) -> None:
    cfg = load_config(
        None,
        [
            "student.model=s",
            "seed=7",
            "rollout.samples_per_prompt=2",
            "rollout.prompts_per_request=2",
            f"rollout.mask_truncated={str(mask_truncated).lower()}",
            "logging.samples_per_step=2",
        ],
    )
    services = FakeServices()
    batch = make_batch(cfg, services, 5, _examples(3), {"cursor": 0}, NO_CONTEXT)  # type: ignore[arg-type]

    # One request per 2 prompts, each seeded by (seed, step, its first prompt).
    assert sorted(services.seeds) == [derive_seed(7, 5, 0), derive_seed(7, 5, 2)]
    assert len(batch.sequences) == 6 and batch.versions == [3] * 6
    trainable = [s.trainable for s in batch.sequences]
    assert trainable == [True, True, True, False, not mask_truncated, True]
    np.testing.assert_array_equal(batch.sequences[0].teacher_logprobs, [-1.0, -1.0, -1.0])
    m = batch.metrics
    assert m["rollout/accuracy/mean"] == pytest.approx(0.5)  # sample 0 of each prompt
    assert m["rollout/empty_frac"] == pytest.approx(1 / 6)
    assert m["rollout/truncated_frac"] == pytest.approx(1 / 6)
    assert m["rollout/num_prompts"] == 3 and m["rollout/num_samples"] == 6
    assert m["timing/rollout_s"] >= 0 and m["timing/score_s"] >= 0
    assert [s["prompt_index"] for s in batch.samples] == [0, 1]
    assert batch.response_tokens == 15


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
