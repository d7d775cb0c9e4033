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
    logp, k_logp = micro_batch_logprobs(policy, mb, temperature)
    assert k_logp is None  # no teacher top-k in these sequences
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
        out = forward_backward(policy, mbs, cfg, temperature=1.0, **totals)
        assert out is not None
        sums, _ = out
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


def _with_top_k(seqs: list[TrainSequence], vocab: int, k: int, seed: int) -> list[TrainSequence]:
    """The same sequences carrying a made-up teacher top-k (distinct ids, a proper mass)."""
    rng = np.random.default_rng(seed)
    for s in seqs:
        r = len(s.response_ids)
        s.teacher_top_ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(r)])
        p = rng.dirichlet(np.ones(k + 1), size=r)[:, :k] if r else np.zeros((0, k))
        s.teacher_top_logprobs = np.log(p).astype(np.float32).reshape(r, k)
    return seqs


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_term_equals_the_full_vocabulary_computation(student, beta: float) -> None:
    """The loss with ``teacher_top_k``: the policy loss plus ``coef * D_beta`` of the student's
    logprobs at the teacher's ids, taken from full logits here, values and gradients; and
    micro-batching still gives the full-batch gradient."""

    model, _ = student
    vocab = model.config.vocab_size
    policy = PolicyModel(model, chunk_tokens=5)
    train = [s for s in _random_sequences(6, vocab, seed=3) if s.trainable]
    train = _with_top_k(train, vocab, k=4, seed=4)
    cfg = LossConfig(teacher_top_k=4, top_k_beta=beta, top_k_coef=0.7)
    n_tok = float(sum(len(s.response_ids) for s in train))

    def grads(budget: int) -> tuple[dict[str, torch.Tensor], float]:
        model.zero_grad()
        plan = plan_micro_batches([s.length for s in train], budget)
        mbs = [collate([train[i] for i in idx], torch.device("cpu")) for idx in plan]
        out = forward_backward(
            policy, mbs, cfg, temperature=1.0, total_tokens=n_tok, total_seqs=len(train)
        )
        assert out is not None
        _, topk_sums = out
        return {n: p.grad.clone() for n, p in model.named_parameters()}, float(topk_sums.divergence)

    full, div_full = grads(10_000)
    micro, div_micro = grads(30)
    assert div_full == pytest.approx(div_micro, rel=1e-5)
    for name in full:
        torch.testing.assert_close(micro[name], full[name], atol=1e-6, rtol=1e-4, msg=name)

    # The reference: full logits, the policy loss, plus the divergence at the teacher's ids.
    model.zero_grad()
    total, divergence = _reference_top_k_loss(model, train, cfg)
    total.backward()
    assert div_full == pytest.approx(divergence, rel=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(full[name], p.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_sequences_in_the_top_k_term_only(student) -> None:
    """``policy_loss=False`` (a truncated response under ``rollout.mask_truncated:
    sampled_token``): the sequence joins the top-k term but adds nothing to the sampled-token
    term, while its tokens still count in both terms' token mean; values and gradients against
    full logits, and micro-batching still gives the full-batch gradient."""
    from trainer.distributed import DistContext
    from trainer.optimization import accumulate_gradients

    model, _ = student
    vocab = model.config.vocab_size
    policy = PolicyModel(model, chunk_tokens=5)
    train = [s for s in _random_sequences(6, vocab, seed=5) if s.trainable]
    train = _with_top_k(train, vocab, k=4, seed=6)
    train[1].policy_loss = False
    train[3].policy_loss = False
    cfg = LossConfig(teacher_top_k=4, top_k_beta=0.0, top_k_coef=0.5)
    pg_seqs = [s for s in train if s.policy_loss]
    assert 0 < len(pg_seqs) < len(train)

    def grads(budget: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        _, metrics = accumulate_gradients(
            policy,
            train,
            cfg,
            DistContext(),
            torch.device("cpu"),
            micro_batch_tokens=budget,
            temperature=1.0,
            backend="torch",
            autocast_dtype=None,
        )
        return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics

    full, m_full = grads(10_000)
    micro, _ = grads(30)
    for name in full:
        torch.testing.assert_close(micro[name], full[name], atol=1e-6, rtol=1e-4, msg=name)
    assert m_full["train/sequences"] == len(train)
    assert m_full["train/policy_loss_sequences"] == len(pg_seqs)

    model.zero_grad()
    total, _ = _reference_top_k_loss(model, train, cfg)
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(full[name], p.grad, atol=2e-5, rtol=1e-4, msg=name)


def _reference_top_k_loss(
    model, train: list[TrainSequence], cfg: LossConfig
) -> tuple[torch.Tensor, float]:
    """The loss from full logits: the policy loss of each sequence in the sampled-token term
    plus ``top_k_coef * D_beta`` at the teacher's ids of every sequence, both token-means over
    all of ``train``'s tokens; and the summed divergence."""
    from trainer.algorithms import reference_loss
    from trainer.kernels.topk_divergence import reference_topk_divergence

    n_tok = float(sum(len(s.response_ids) for s in train))
    total = torch.zeros(())
    divergence = 0.0
    for s in train:
        ids = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]))[None]
        p, r = len(s.prompt_ids), len(s.response_ids)
        rows = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[p - 1 : p - 1 + r]
        if s.policy_loss:
            pg, _ = reference_loss(
                rows.gather(1, ids[0, p : p + r, None])[:, 0][None],
                torch.from_numpy(s.behaviour_logprobs)[None],
                torch.from_numpy(s.teacher_logprobs)[None],
                torch.ones(1, r, dtype=torch.bool),
                cfg,
                total_tokens=n_tok,
                total_seqs=len(train),
            )
            total = total + pg
        k_logp = rows.gather(1, torch.from_numpy(s.teacher_top_ids))
        div = reference_topk_divergence(
            k_logp, torch.from_numpy(s.teacher_top_logprobs), cfg.top_k_beta
        ).divergence
        divergence += float(div.detach().sum())
        total = total + cfg.top_k_coef * div.sum() / n_tok
    return total, divergence
