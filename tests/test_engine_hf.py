"""The hf engine backend against direct transformers forwards (CPU, tiny random Llama).

Async engine calls run on one module-scoped event loop (no pytest-asyncio needed). Loading
weights is tests/test_engine_hf_weights.py.
"""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine import EngineRequestError, SamplingSpec, ScoreInput
from tests.engine_hf import (
    _start,
    _start_on,
    loop,
    prompt_ids,
    ref_logprobs,
    ref_token_logprobs,
    tok,
)

__all__ = ["loop", "prompt_ids", "tok"]  # the shared module-scoped fixtures

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine(loop, tiny_models):
    eng = _start(loop, tiny_models["student"])
    yield eng
    loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def ref_model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(str(tiny_models["student"]), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- info


def test_info(engine, tiny_models):
    info = engine.info()
    assert info.backend == "hf" and info.device == "cpu" and info.dtype == "float32"
    assert info.vocab_size == 512 and info.max_model_len == 1024
    assert info.eos_token_ids == [engine.tokenizer.eos_token_id]
    assert len(info.tokenizer_fingerprint) == 64
    parts = info.tokenizer_fingerprint_components
    from services.engine.fingerprint import COMPONENTS, fingerprint_components

    assert set(parts) == set(COMPONENTS)
    assert parts == fingerprint_components(engine.tokenizer)


# --------------------------------------------------------------------------- score


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_matches_direct_forward(loop, engine, ref_model, prompt_ids, temperature):
    # several lengths and starts in one call: exercises right padding in one batch
    inputs = [
        ScoreInput(token_ids=ids, start=start, temperature=temperature)
        for ids in prompt_ids
        for start in (1, max(1, len(ids) // 2), len(ids))
    ]
    results = loop.run_until_complete(engine.score(inputs))
    for inp, res in zip(inputs, results, strict=True):
        ref = ref_token_logprobs(ref_model, inp.token_ids, inp.start, temperature)
        assert res.logprobs.dtype == np.float32
        assert res.logprobs.shape == (len(inp.token_ids) - inp.start,)
        np.testing.assert_allclose(res.logprobs, ref, atol=1e-4)
        assert res.top_token_ids is None and res.top_logprobs is None


def test_score_top_k_matches_torch_topk(loop, engine, ref_model, prompt_ids):
    ids = prompt_ids[2]
    (res,) = loop.run_until_complete(engine.score([ScoreInput(ids, start=3, top_k=5, temperature=0.7)]))
    lp = ref_logprobs(ref_model, ids, 0.7)[2 : len(ids) - 1]
    vals, idx = torch.topk(lp, 5, dim=-1)
    assert res.top_token_ids.dtype == np.int32 and res.top_token_ids.shape == (len(ids) - 3, 5)
    np.testing.assert_array_equal(res.top_token_ids, idx.numpy())
    np.testing.assert_allclose(res.top_logprobs, vals.numpy(), atol=1e-4)
    assert np.all(np.diff(res.top_logprobs, axis=1) <= 0)


def test_score_rejects_bad_input(loop, engine):
    with pytest.raises(EngineRequestError, match=r"sequences\[0\].start"):
        loop.run_until_complete(engine.score([ScoreInput([5, 6, 7], start=0)]))
    with pytest.raises(EngineRequestError, match=r"sequences\[1\].token_ids\[2\]"):
        loop.run_until_complete(engine.score([ScoreInput([5, 6], 1), ScoreInput([5, 6, 9999], 1)]))
    with pytest.raises(EngineRequestError, match="max_model_len"):
        loop.run_until_complete(engine.score([ScoreInput([5] * 1025, 1)]))
    with pytest.raises(EngineRequestError, match=r"prompts\[0\].token_ids\[1\]"):
        loop.run_until_complete(engine.generate([[5, -1]], SamplingSpec()))
    assert loop.run_until_complete(engine.score([])) == []


# --------------------------------------------------------------------------- generate


def test_greedy_matches_hf_generate(loop, engine, ref_model, prompt_ids):
    spec = SamplingSpec(n=1, max_tokens=12, temperature=0.0)
    # all prompts in one call: left padding of different lengths in one batch
    out = loop.run_until_complete(engine.generate(prompt_ids, spec))
    eos = engine.info().eos_token_ids
    for ids, (sample,) in zip(prompt_ids, out, strict=True):
        with torch.no_grad():
            gen = ref_model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0
            )[0, len(ids) :].tolist()
        assert sample.token_ids == gen[: len(sample.token_ids)]
        assert sample.finish_reason == ("stop" if sample.token_ids[-1] in eos else "length")
        # greedy reports temperature-1 logprobs of the chosen tokens
        full = ids + sample.token_ids
        np.testing.assert_allclose(sample.logprobs, ref_token_logprobs(ref_model, full, len(ids)), atol=1e-4)
        assert sample.text == engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)


def test_sampled_logprobs_match_forward_and_top_logprobs(loop, engine, ref_model, prompt_ids):
    spec = SamplingSpec(n=3, max_tokens=10, temperature=0.8, seed=7, top_logprobs=3)
    out = loop.run_until_complete(engine.generate(prompt_ids[:2], spec))
    assert [len(samples) for samples in out] == [3, 3]
    for ids, samples in zip(prompt_ids[:2], out, strict=True):
        for sample in samples:
            full = ids + sample.token_ids
            lp = ref_logprobs(ref_model, full, 0.8)[len(ids) - 1 : len(full) - 1]
            ref = lp.gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0].numpy()
            np.testing.assert_allclose(sample.logprobs, ref, atol=1e-4)
            assert len(sample.top_logprobs) == len(sample.token_ids)
            vals, idx = torch.topk(lp, 3, dim=-1)
            for step, alts in enumerate(sample.top_logprobs):
                assert list(alts) == idx[step].tolist()
                np.testing.assert_allclose(list(alts.values()), vals[step].numpy(), atol=1e-4)


def _filtered_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Independent reference of vLLM's processed logprobs: temperature, top-k, top-p."""
    scaled = logits / temperature
    kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    out = scaled.clone()
    for row in range(scaled.shape[0]):
        order = torch.argsort(probs[row], descending=True)
        cum_before = torch.cumsum(probs[row][order], 0) - probs[row][order]
        # keep while the mass of strictly-more-likely tokens is < top_p
        drop = order[cum_before >= top_p]
        out[row, drop] = float("-inf")
    return torch.log_softmax(out, dim=-1)


def test_top_k_top_p_logprobs_are_post_filter(loop, engine, ref_model, prompt_ids):
    spec = SamplingSpec(n=4, max_tokens=8, temperature=0.9, top_k=20, top_p=0.7, seed=3)
    out = loop.run_until_complete(engine.generate([prompt_ids[0]], spec))
    ids = prompt_ids[0]
    for sample in out[0]:
        full = ids + sample.token_ids
        with torch.no_grad():
            logits = ref_model(torch.tensor([full])).logits[0].float()[len(ids) - 1 : len(full) - 1]
        lp = _filtered_logprobs(logits, 0.9, 20, 0.7)
        ref = lp.gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0].numpy()
        assert np.all(np.isfinite(ref)), "a sampled token lies outside the top-k/top-p set"
        np.testing.assert_allclose(sample.logprobs, ref, atol=1e-4)


def test_seed_reproducible_and_n_samples(loop, engine, prompt_ids):
    spec = SamplingSpec(n=4, max_tokens=12, temperature=1.0, seed=1234)
    a = loop.run_until_complete(engine.generate(prompt_ids, spec))
    b = loop.run_until_complete(engine.generate(prompt_ids, spec))
    assert [[s.token_ids for s in p] for p in a] == [[s.token_ids for s in p] for p in b]
    assert [[s.logprobs for s in p] for p in a] == [[s.logprobs for s in p] for p in b]
    assert all(len(p) == 4 for p in a)
    # the n samples of one prompt are different draws
    assert len({tuple(s.token_ids) for s in a[0]}) > 1
    c = loop.run_until_complete(engine.generate(prompt_ids, SamplingSpec(n=4, max_tokens=12, seed=99)))
    assert [[s.token_ids for s in p] for p in a] != [[s.token_ids for s in p] for p in c]


def test_max_tokens_gives_length(loop, engine, prompt_ids):
    out = loop.run_until_complete(
        engine.generate([prompt_ids[0]], SamplingSpec(max_tokens=5, temperature=0.0, ignore_eos=True))
    )
    (sample,) = out[0]
    assert sample.finish_reason == "length" and sample.stop_reason is None
    assert len(sample.token_ids) == len(sample.logprobs) == 5


def test_stop_strings(loop, engine, prompt_ids):
    base = SamplingSpec(max_tokens=30, temperature=1.0, seed=11, ignore_eos=True)
    (free,) = loop.run_until_complete(engine.generate([prompt_ids[2]], base))[0]
    text = free.text
    assert len(text) > 8
    stop = text[5:8]
    cut = text.find(stop)
    (stopped,) = loop.run_until_complete(
        engine.generate([prompt_ids[2]], SamplingSpec(**{**base.__dict__, "stop": ("zzzz", stop)}))
    )[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == text[:cut]  # text ends before the stop string
    # token ids: the sampled prefix up to and including the token that completed the stop string
    n = len(stopped.token_ids)
    assert stopped.token_ids == free.token_ids[:n] and stopped.logprobs == free.logprobs[:n]
    decode = engine.tokenizer.decode
    assert stop in decode(stopped.token_ids, skip_special_tokens=True)
    assert stop not in decode(stopped.token_ids[:-1], skip_special_tokens=True)


def test_eos_and_stop_token_ids_are_included(loop, engine, tiny_models, tmp_path, prompt_ids):
    greedy = SamplingSpec(max_tokens=10, temperature=0.0, ignore_eos=True)
    (free,) = loop.run_until_complete(engine.generate([prompt_ids[2]], greedy))[0]
    target = free.token_ids[3]
    first = free.token_ids.index(target)
    # stop_token_ids: included, stop_reason = the id, excluded from text
    spec = SamplingSpec(max_tokens=10, temperature=0.0, stop_token_ids=(target,))
    (s,) = loop.run_until_complete(engine.generate([prompt_ids[2]], spec))[0]
    assert s.token_ids == free.token_ids[: first + 1] and s.finish_reason == "stop"
    assert s.stop_reason == target
    assert s.text == engine.tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)
    # EOS: a copy of the model whose tokenizer's EOS is that token
    copy = tmp_path / "eos_model"
    shutil.copytree(tiny_models["student"], copy)
    t = AutoTokenizer.from_pretrained(str(copy))
    t.eos_token = t.convert_ids_to_tokens(target)
    t.save_pretrained(str(copy))
    eos_engine = _start(loop, copy)
    try:
        assert eos_engine.info().eos_token_ids[0] == target
        (e,) = loop.run_until_complete(
            eos_engine.generate([prompt_ids[2]], SamplingSpec(max_tokens=10, temperature=0.0))
        )[0]
        assert e.token_ids == free.token_ids[: first + 1]
        assert e.finish_reason == "stop" and e.stop_reason is None
        assert len(e.logprobs) == len(e.token_ids)
        # ignore_eos generates past it
        (g,) = loop.run_until_complete(eos_engine.generate([prompt_ids[2]], greedy))[0]
        assert g.token_ids == free.token_ids and g.finish_reason == "length"
    finally:
        loop.run_until_complete(eos_engine.shutdown())


def test_concurrent_equals_sequential(loop, engine, prompt_ids, monkeypatch):
    score_calls = [
        [ScoreInput(prompt_ids[i % 3], start=1 + i % 2, top_k=i % 3, temperature=1.0 - 0.05 * i)]
        for i in range(6)
    ]
    gen_calls = [
        (prompt_ids[i % 3 :], SamplingSpec(n=2, max_tokens=6 + i, temperature=0.0 if i % 2 else 0.9, seed=i))
        for i in range(5)
    ] + [([prompt_ids[i % 3]], SamplingSpec(max_tokens=6, temperature=0.0)) for i in range(5)]

    async def sequential():
        scores = [await engine.score(c) for c in score_calls]
        gens = [await engine.generate(p, s) for p, s in gen_calls]
        return scores, gens

    seq_scores, seq_gens = loop.run_until_complete(sequential())
    score_batches: list[int] = []
    group_requests: list[int] = []
    monkeypatch.setattr(engine, "batch_observer", lambda op, n: op == "score" and score_batches.append(n))
    original_prefill = engine.scheduler.stepper.prefill

    def spy_prefill(group):
        group_requests.append(len(group.requests))
        return original_prefill(group)

    monkeypatch.setattr(engine.scheduler.stepper, "prefill", spy_prefill)

    async def concurrent():
        results = await asyncio.gather(
            *[engine.score(c) for c in score_calls], *[engine.generate(p, s) for p, s in gen_calls]
        )
        return results[: len(score_calls)], results[len(score_calls) :]

    con_scores, con_gens = loop.run_until_complete(concurrent())
    assert len(con_scores) + len(con_gens) == 16
    for a, b in zip(seq_scores, con_scores, strict=True):
        for ra, rb in zip(a, b, strict=True):
            np.testing.assert_allclose(ra.logprobs, rb.logprobs, atol=1e-5)
            if ra.top_token_ids is not None:
                np.testing.assert_array_equal(ra.top_token_ids, rb.top_token_ids)
    for (_, spec), a, b in zip(gen_calls, seq_gens, con_gens, strict=True):
        for pa, pb in zip(a, b, strict=True):
            for sa, sb in zip(pa, pb, strict=True):
                assert sa.token_ids == sb.token_ids and sa.text == sb.text
                if spec.seed is not None:
                    assert sa.logprobs == sb.logprobs  # seeded: bit-identical
                else:
                    np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=1e-5)
    # coalescing across requests: score calls (one sequence each) shared a forward, and
    # unseeded generate calls shared a group
    assert max(score_batches) > 1 and len(score_batches) < len(score_calls)
    assert max(group_requests) > 1


def test_failing_request_fails_alone(loop, engine, prompt_ids, monkeypatch):
    poison = 499
    original = engine.runner.forward

    def flaky(input_ids, *args, **kwargs):
        if (input_ids == poison).any():
            raise RuntimeError("boom")
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", flaky)
    good = prompt_ids[0]
    bad = [*prompt_ids[1], poison]
    greedy = SamplingSpec(max_tokens=5, temperature=0.0)

    async def mixed():
        return await asyncio.gather(
            engine.score([ScoreInput(good, 1)]),
            engine.score([ScoreInput(bad, 1)]),
            engine.generate([good], greedy),
            engine.generate([bad], greedy),
            engine.generate([prompt_ids[2]], SamplingSpec(n=2, max_tokens=5)),
            return_exceptions=True,
        )

    ok_score, bad_score, ok_gen, bad_gen, ok_gen2 = loop.run_until_complete(mixed())
    assert isinstance(bad_score, RuntimeError) and isinstance(bad_gen, RuntimeError)
    assert not isinstance(ok_score, BaseException) and not isinstance(ok_gen, BaseException)
    assert not isinstance(ok_gen2, BaseException) and len(ok_gen2[0]) == 2
    monkeypatch.setattr(engine.runner, "forward", original)
    (ref_score,) = loop.run_until_complete(engine.score([ScoreInput(good, 1)]))
    np.testing.assert_allclose(ok_score[0].logprobs, ref_score.logprobs, atol=1e-5)
    ref_gen = loop.run_until_complete(engine.generate([good], greedy))
    assert ok_gen[0][0].token_ids == ref_gen[0][0].token_ids
    # the engine keeps serving the next request
    assert loop.run_until_complete(engine.generate([bad], greedy))[0][0].token_ids


def test_shared_group_failure_after_a_row_finished(loop, engine, prompt_ids, monkeypatch):
    """A shared generation batch fails on a decode step after one request's row already
    finished inside that step: both requests are retried alone and both complete."""
    original = engine.runner.forward
    calls = {"decode_failures": 0}

    def fail_first_decode(input_ids, *args, **kwargs):
        if input_ids.shape[1] == 1 and input_ids.shape[0] > 1 and calls["decode_failures"] == 0:
            calls["decode_failures"] += 1
            raise RuntimeError("transient")
        return original(input_ids, *args, **kwargs)

    short = SamplingSpec(max_tokens=1, temperature=0.0)
    longer = SamplingSpec(n=2, max_tokens=4, temperature=0.0)
    async def scenario():
        return await asyncio.wait_for(
            asyncio.gather(engine.generate([prompt_ids[0]], short), engine.generate([prompt_ids[1]], longer)),
            timeout=20,
        )

    expected = loop.run_until_complete(scenario())
    monkeypatch.setattr(engine.runner, "forward", fail_first_decode)
    got = loop.run_until_complete(scenario())
    assert calls["decode_failures"] == 1
    for a, b in zip(expected, got, strict=True):
        assert [[s.token_ids for s in p] for p in a] == [[s.token_ids for s in p] for p in b]


def test_cancelled_generation_is_dropped(loop, engine, prompt_ids):
    async def scenario():
        task = asyncio.create_task(
            engine.generate([prompt_ids[0]], SamplingSpec(max_tokens=500, ignore_eos=True))
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.generate([prompt_ids[1]], SamplingSpec(max_tokens=3, temperature=0.0))

    out = loop.run_until_complete(scenario())
    assert len(out[0][0].token_ids) == 3
    assert not engine.scheduler.groups and not engine.scheduler.gen_queue


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(loop, engine, tiny_models, prompt_ids):
    gpu = _start_on(loop, tiny_models["student"], "cuda")
    try:
        assert gpu.info().device.startswith("cuda")
        inputs = [ScoreInput(ids, start=1, top_k=2, temperature=0.7) for ids in prompt_ids]
        cpu_scores = loop.run_until_complete(engine.score(inputs))
        gpu_scores = loop.run_until_complete(gpu.score(inputs))
        for a, b in zip(cpu_scores, gpu_scores, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-3)
        spec = SamplingSpec(n=2, max_tokens=8, temperature=1.0, seed=5, top_logprobs=2)
        a = loop.run_until_complete(gpu.generate(prompt_ids, spec))
        b = loop.run_until_complete(gpu.generate(prompt_ids, spec))
        assert [[s.token_ids for s in p] for p in a] == [[s.token_ids for s in p] for p in b]
    finally:
        loop.run_until_complete(gpu.shutdown())


def test_small_budgets_split_work_but_not_results(loop, engine, tiny_models, prompt_ids):
    small = _start(loop, tiny_models["student"], max_batch_tokens=16, max_num_seqs=3, batch_wait_ms=0)
    try:
        greedy = SamplingSpec(n=2, max_tokens=6, temperature=0.0, top_logprobs=1)
        inputs = [ScoreInput(ids, start=1) for ids in prompt_ids]

        async def both(eng):
            return await asyncio.gather(eng.generate(prompt_ids, greedy), eng.score(inputs))

        (gen_a, score_a), (gen_b, score_b) = (loop.run_until_complete(both(e)) for e in (engine, small))
        assert [[s.token_ids for s in p] for p in gen_a] == [[s.token_ids for s in p] for p in gen_b]
        for a, b in zip(score_a, score_b, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    finally:
        loop.run_until_complete(small.shutdown())


@pytest.mark.vllm
def test_top_k_top_p_filter_matches_vllm():
    """The sampling filter is vLLM's (ties, top-k then top-p, the most likely always kept)."""
    ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    from services.engine.hf import apply_top_k_top_p

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch, vocab = 6, 300
        logits = torch.randn(batch, vocab, generator=gen) * 3
        logits[0, :5] = logits[0, 5]  # ties at the k-th value
        k = torch.randint(1, vocab, (batch,), generator=gen)
        k[1] = vocab
        p = torch.rand(batch, generator=gen).clamp(min=0.05)
        p[2] = 1.0
        for kk, pp in ((k, p), (k, None), (None, p)):
            ref = ops.apply_top_k_top_p_pytorch(logits.clone(), kk, pp, allow_cpu_sync=False)
            mine = apply_top_k_top_p(logits.clone(), kk, pp)
            assert torch.equal(torch.isinf(ref), torch.isinf(mine))
            assert torch.equal(ref[~torch.isinf(ref)], mine[~torch.isinf(mine)])


# --------------------------------------------------------------------------- tokenization helpers


def test_tokenization_helpers(tok, ref_model):
    from services.engine import tokenization

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]}]
    text = tokenization.render_chat(tok, messages)
    assert text.endswith("<|im_start|>assistant\n") and "2+2?" in text
    ids = tokenization.chat_prompt_ids(tok, messages)
    flat = [messages[0], {"role": "user", "content": "2+2?"}]
    expected = tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(expected)
    full, start = tokenization.prompt_completion_ids(tok, ids, " 4")
    assert full[:start] == ids and full[start:] == tok.encode(" 4", add_special_tokens=False)
    assert tokenization.text_prompt_ids(tok, "Tom has") == tok.encode("Tom has")
    assert tokenization.resolve_eos_ids(tok, ref_model.generation_config) == [tok.eos_token_id]

    class GenConfig:
        eos_token_id = [7, tok.eos_token_id, 9]

    assert tokenization.resolve_eos_ids(tok, GenConfig()) == [tok.eos_token_id, 7, 9]
