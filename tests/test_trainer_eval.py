"""The held-out reverse-KL estimate (``trainer.eval.measure_reverse_kl``) on fake services."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from services.protocol import RolloutItem, RolloutResponse, RolloutUsage
from trainer.clients import TokenScores
from trainer.data import Example
from trainer.eval import ReverseKL, measure_reverse_kl, sample_reverse_kl

EXAMPLES = [
    Example(index=i, question=f"Q{i} ?", answer=f"#### {i}", ground_truth=str(i)) for i in range(2)
]
#: Answer lengths per (prompt, sample): a long and a short answer per prompt, one empty.
LENGTHS = {(0, 0): 4, (0, 1): 1, (1, 0): 3, (1, 1): 0}
#: The teacher's logprob of answer tokens 0..3 (every answer starts with the same tokens).
TAU = [-1.0, -2.0, -0.5, -3.0]
SAMPLING = {"samples_per_prompt": 2, "max_tokens": 8, "temperature": 1.0}


def _rollouts(prompts, *, n, max_tokens, temperature, seed) -> RolloutResponse:
    """Every student token has logprob -0.5; the answer's tokens are 10, 11, ..."""
    items = [
        RolloutItem(
            prompt_index=p,
            sample_index=k,
            prompt_token_ids=[1, 2],
            token_ids=list(range(10, 10 + LENGTHS[p, k])),
            logprobs=[-0.5] * LENGTHS[p, k],
            text="x",
            finish_reason="stop",
            policy_version=0,
        )
        for p in range(len(prompts))
        for k in range(n)
    ]
    return RolloutResponse(
        model="m",
        policy_version=0,
        data=items,
        usage=RolloutUsage(prompt_tokens=0, completion_tokens=0),
    )


def _teacher(per_token: list[float]) -> SimpleNamespace:
    """A teacher whose logprob of the i-th answer token is ``per_token[i]``."""

    def score(prompts, responses, *, temperature, **_):
        return [
            TokenScores(logprobs=np.asarray(per_token[: len(r)], dtype=np.float32))
            for r in responses
        ]

    return SimpleNamespace(score=score)


def test_reverse_kl_per_token_and_per_answer() -> None:
    """``sum(s - tau)`` over every sampled token, divided by the tokens and by the answers
    (an empty answer counts as an answer with nothing to add)."""
    # s - tau = -0.5 - tau: 0.5, 1.5, 0.0, 2.5 for answer tokens 0..3
    kl = measure_reverse_kl(_rollouts, _teacher(TAU), EXAMPLES, **SAMPLING)
    total = (0.5 + 1.5 + 0.0 + 2.5) + 0.5 + (0.5 + 1.5 + 0.0) + 0.0
    assert kl.per_token == pytest.approx(total / 8)
    assert kl.per_answer == pytest.approx(total / 4)
    assert kl.metrics() == {
        "eval/reverse_kl": kl.per_token,
        "eval/reverse_kl_per_answer": kl.per_answer,
    }


def test_no_samples_is_zero_not_a_division_error() -> None:
    kl = measure_reverse_kl(_rollouts, _teacher([]), [], **SAMPLING)
    assert kl == ReverseKL(0.0, 0.0)


def test_samples_keep_each_answer_apart() -> None:
    """``sample_reverse_kl``: one ``s - tau`` array per answer, aligned with its tokens."""
    samples = sample_reverse_kl(_rollouts, _teacher(TAU), EXAMPLES, **SAMPLING)
    assert [len(x.token_ids) for x in samples] == [4, 1, 3, 0]
    np.testing.assert_allclose(samples[0].diffs, [0.5, 1.5, 0.0, 2.5])
    np.testing.assert_allclose(samples[2].diffs, [0.5, 1.5, 0.0])
    assert samples[0].token_ids.tolist() == [10, 11, 12, 13]
