"""The student side: chunked logprobs equal full-vocabulary logprobs (values and gradients),
micro-batching gives the full-batch gradient, the micro-batch planner keeps its budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.algorithms import LossConfig
from trainer.config import StudentConfig
from trainer.policy import (
    PolicyModel,
    TrainSequence,
    chunked_token_logprobs,
    collate,
    export_state_dict,
    forward_backward,
    load_student,
    micro_batch_logprobs,
    plan_micro_batches,
)


@pytest.fixture(scope="module")
def student(tiny_models):
    torch.manual_seed(0)
    model, tok = load_student(StudentConfig(model=str(tiny_models["student"])), torch.device("cpu"))
    return model, tok


def _random_sequences(n: int, vocab: int, seed: int = 0) -> list[TrainSequence]:
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n):
        p, r = int(rng.integers(3, 12)), int(rng.integers(0 if i == 3 else 1, 15))
        seqs.append(
            TrainSequence(
                prompt_ids=rng.integers(0, vocab, p),
                response_ids=rng.integers(0, vocab, r),
                behaviour_logprobs=(-rng.random(r) * 4).astype(np.float32),
                teacher_logprobs=(-rng.random(r) * 4).astype(np.float32),
                trainable=r > 0,
            )
        )
    return seqs


def _full_logprobs(model, seqs: list[TrainSequence], temperature: float) -> list[torch.Tensor]:
    """The naive reference: full logits of every sequence, log_softmax(logits / T), gather."""
    out = []
    for s in seqs:
        ids = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]))[None]
        logits = model(input_ids=ids).logits[0].float() / temperature
        logp = torch.log_softmax(logits, -1)
        p, r = len(s.prompt_ids), len(s.response_ids)
        out.append(logp[p - 1 : p - 1 + r].gather(1, ids[0, p : p + r, None]).squeeze(1))
    return out


def test_chunked_head_matches_dense_and_gradchecks() -> None:
    torch.manual_seed(0)
    n, h, v = 23, 8, 40
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    for chunk in (1, 5, 23, 100):
        got = chunked_token_logprobs(hidden, weight, bias, targets, 0.7, chunk)
        want = (
            torch.log_softmax((hidden @ weight.T + bias) / 0.7, -1)
            .gather(1, targets[:, None])
            .squeeze(1)
        )
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda a, b, c: chunked_token_logprobs(a, b, c, targets, 0.7, 4), (hidden, weight, bias)
    )


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_policy_logprobs_equal_full_logprobs_values_and_grads(student, temperature: float) -> None:
    model, _ = student
    seqs = [s for s in _random_sequences(6, model.config.vocab_size) if s.trainable]
    policy = PolicyModel(model, chunk_tokens=7)  # chunks smaller than a sequence on purpose

    model.zero_grad()
    mb = collate(seqs, torch.device("cpu"))
    logp = micro_batch_logprobs(policy, mb, temperature)
    chunked = [logp[i, : len(s.response_ids)] for i, s in enumerate(seqs)]
    weights = [torch.randn(len(s.response_ids)) for s in seqs]
    sum(torch.dot(w, c) for w, c in zip(weights, chunked, strict=True)).backward()
    grads_chunked = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    full = _full_logprobs(model, seqs, temperature)
    sum(torch.dot(w, f) for w, f in zip(weights, full, strict=True)).backward()
    for c, f in zip(chunked, full, strict=True):
        torch.testing.assert_close(c, f, atol=2e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_chunked[name], p.grad, atol=2e-5, rtol=1e-4, msg=name)
    # Masked-out positions are exactly 0 and carry no gradient.
    assert torch.all(logp[~mb.mask] == 0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_give_the_full_batch_gradient(student, aggregation: str) -> None:
    model, _ = student
    policy = PolicyModel(model, chunk_tokens=16)
    seqs = _random_sequences(10, model.config.vocab_size, seed=1)
    cfg = LossConfig(aggregation=aggregation)
    # Perturb so the PPO ratio is not 1 everywhere (exercises clipping as well).
    train = [s for s in seqs if s.trainable]
    totals = {
        "total_tokens": float(sum(len(s.response_ids) for s in train)),
        "total_seqs": float(len(train)),
    }

    def grads(budget: int) -> tuple[dict[str, torch.Tensor], float, int]:
        model.zero_grad()
        plan = plan_micro_batches([s.length for s in train], budget)
        mbs = [collate([train[i] for i in idx], torch.device("cpu")) for idx in plan]
        sums = forward_backward(policy, mbs, cfg, temperature=1.0, **totals)
        assert sums is not None
        return (
            {n: p.grad.clone() for n, p in model.named_parameters()},
            float(sums.pg_loss),
            len(plan),
        )

    full, loss_full, n_full = grads(10_000)
    micro, loss_micro, n_micro = grads(30)
    assert n_full == 1 and n_micro > 3
    assert loss_full == pytest.approx(loss_micro, rel=1e-5)
    for name in full:
        torch.testing.assert_close(micro[name], full[name], atol=1e-6, rtol=1e-4, msg=name)


def test_plan_micro_batches_respects_budget_and_covers_everything() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 300, 200)]
    plan = plan_micro_batches(lengths, 1024)
    flat = sorted(i for mb in plan for i in mb)
    assert flat == list(range(len(lengths)))
    for mb in plan:
        assert len(mb) * max(lengths[i] for i in mb) <= 1024
    # An over-long sequence goes alone instead of being dropped.
    assert plan_micro_batches([5000, 10, 10], 1024) == [[0], [1, 2]]
    assert plan_micro_batches([], 100) == []


def test_zero_length_and_untrainable_rows_are_masked(student) -> None:
    model, _ = student
    seqs = _random_sequences(5, model.config.vocab_size, seed=3)
    seqs[0].trainable = False
    empty = np.zeros(0, dtype=np.int64)
    seqs[3] = TrainSequence(
        seqs[3].prompt_ids, empty, empty.astype(np.float32), empty.astype(np.float32)
    )
    mb = collate(seqs, torch.device("cpu"))
    assert not mb.mask[0].any() and not mb.mask[3].any()  # untrainable, and empty
    assert int(mb.mask.sum()) == sum(len(s.response_ids) for s in seqs[1:])


def test_export_state_dict_casts_and_drops_tied_head(student) -> None:
    model, _ = student
    state = export_state_dict(model.state_dict(), model, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in state.values())
    assert "lm_head.weight" in state  # the tiny model does not tie embeddings
    model.config.tie_word_embeddings = True
    try:
        assert "lm_head.weight" not in export_state_dict(model.state_dict(), model, torch.float32)
    finally:
        model.config.tie_word_embeddings = False
