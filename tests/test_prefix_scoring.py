"""Prefix sharing in scoring: a prefix common to several sequences is computed once, exactly.

hf: the sharing path (`services.engine.hf.prefix`) against the plain path and a direct
transformers forward, on batches shaped like the trainer's (a shared context, prompts with
several samples each) with `start` before, at and after the shared prefix's end. vLLM: the
prompt path reading the prefix cache against the same path not reading it (one module-scoped
engine; vLLM is slow to start).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine import EngineConfig, ScoreInput, make_engine
from services.engine.hf.prefix import MIN_SHARED, build_tree, pack_shared
from tests.backends import needs_vllm

ATOL = 2e-5  # float32 rounding of a differently batched forward is ~1e-6 here


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop, tiny_models):
    eng = make_engine(EngineConfig(model=str(tiny_models["student"]), device="cpu"))
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def ref_model(tiny_models):
    path = str(tiny_models["student"])
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ref_score(model, inp: ScoreInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Direct forward: the target logprobs and the top-k of `log_softmax(logits / T)`."""
    with torch.no_grad():
        logits = model(torch.tensor([inp.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits / inp.temperature, dim=-1)[inp.start - 1 : -1]
    target = lp.gather(1, torch.tensor(inp.token_ids[inp.start :])[:, None])[:, 0]
    vals, ids = torch.topk(lp, max(inp.top_k, 1), dim=-1)
    return target.numpy(), ids.numpy(), vals.numpy()


def trainer_batch(
    seed: int,
    context: int = 80,
    question: int = 40,
    completion: int = 24,
    vocab: int = 500,
    tempered: bool = True,
) -> tuple[list[ScoreInput], int]:
    """3 prompts x 3 samples after one shared context; several starts, top_k and T."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(3, vocab, context).tolist()
    inputs = []
    for p in range(3):
        prompt = ctx + rng.integers(3, vocab, question + 7 * p).tolist()
        for s in range(3):
            ids = prompt + rng.integers(3, vocab, completion + 5 * s).tolist()
            k, t = (5 if s == 1 else 0), (0.7 if p == 1 and tempered else 1.0)
            # at the prompt's end (the trainer's case) and, for some, elsewhere
            starts = [len(prompt)]
            if s == 0:
                starts += [context - 9, context, context + 1, len(prompt) + 3]
            inputs += [ScoreInput(ids, start, top_k=k, temperature=t) for start in starts]
    # a sequence sharing nothing, and one equal to another (duplicates share all)
    inputs.append(ScoreInput(rng.integers(3, vocab, 50).tolist(), 1, top_k=5))
    inputs.append(inputs[0])
    return inputs, context


def assert_same(a, b, inp: ScoreInput, atol: float = ATOL) -> None:
    """Two results of one input agree: logprobs, and top-k up to near-ties."""
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, rtol=0)
    if inp.top_k:
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=atol, rtol=0)
        differ = a.top_token_ids != b.top_token_ids
        # an id may only differ where two alternatives are tied to rounding
        assert np.all(
            np.abs(np.diff(a.top_logprobs, axis=1)).min(axis=1)[differ.any(axis=1)] < atol
        )
    else:
        assert a.top_token_ids is None and b.top_token_ids is None


def forwarded_tokens(engine, monkeypatch) -> list[int]:
    """Record the new tokens of every model forward (rows x width)."""
    tokens: list[int] = []
    original = engine.runner.forward

    def spy(input_ids, *args, **kwargs):
        tokens.append(int(input_ids.numel()))
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", spy)
    return tokens


# --------------------------------------------------------------------------- the tree


def test_tree_shares_context_and_prompts():
    inputs, context = trainer_batch(0)
    nodes, leaves = build_tree(inputs)
    assert sorted(leaf.index for leaf in leaves) == list(range(len(inputs)))
    # the root node is the context up to the earliest start - 1 among the context sharers
    (root,) = [n for n in nodes if n.level == 1]
    assert root.offset == 0 and root.end == context - 10
    assert all(len(n.tokens) >= MIN_SHARED for n in nodes)
    for leaf in leaves:
        inp = inputs[leaf.index]
        # everything from start - 1 on is the leaf's own (the scored logits come from it)
        assert leaf.offset <= inp.start - 1 and leaf.offset + leaf.first == inp.start - 1
        assert leaf.tokens == inp.token_ids[leaf.offset : -1]
        node, prefix = leaf.parent, []
        while node is not None:
            prefix = node.tokens + prefix
            node = node.parent
        assert prefix == inp.token_ids[: leaf.offset]
    assert next(leaf for leaf in leaves if inputs[leaf.index].start == 1).parent is None


def test_pack_shared_keeps_sharers_together_within_budget():
    inputs, _ = trainer_batch(1)
    batches = pack_shared(inputs, lambda inp: inp, 16384)
    assert sorted(map(id, sum(batches, []))) == sorted(map(id, inputs))
    # one chunk of sharers, the lone sequence packed apart
    assert [len(b) for b in batches] == [len(inputs) - 1, 1]
    small = pack_shared(inputs, lambda inp: inp, 200)
    assert len(small) > 2 and sorted(map(id, sum(small, []))) == sorted(map(id, inputs))
    for chunk in small[:-1]:
        keys = sorted(inp.token_ids[: inp.start - 1] for inp in chunk)
        distinct = len(keys[0]) + sum(
            len(b) - len(os.path.commonprefix([a, b])) for a, b in itertools.pairwise(keys)
        )
        assert distinct <= 200 or len(chunk) == 1


# --------------------------------------------------------------------------- hf engine


@pytest.mark.parametrize("seed", [0, 1])
def test_sharing_equals_plain_and_direct_forward(loop, engine, ref_model, monkeypatch, seed):
    inputs, _ = trainer_batch(seed)
    tokens = forwarded_tokens(engine, monkeypatch)
    engine.prefix_sharing = False
    plain = loop.run_until_complete(engine.score(inputs))
    plain_tokens, tokens[:] = sum(tokens), []
    engine.prefix_sharing = True
    shared = loop.run_until_complete(engine.score(inputs))
    # the prefixes really were computed once: far fewer tokens went through the model
    assert sum(tokens) < 0.6 * plain_tokens
    for inp, a, b in zip(inputs, shared, plain, strict=True):
        assert_same(a, b, inp)
        target, ids, vals = ref_score(ref_model, inp)
        np.testing.assert_allclose(a.logprobs, target, atol=ATOL, rtol=0)
        if inp.top_k:
            np.testing.assert_allclose(a.top_logprobs, vals, atol=ATOL, rtol=0)
            assert (a.top_token_ids == ids).mean() > 0.99


def test_small_budget_and_concurrent_requests(loop, tiny_models, engine):
    """Many chunks and batches (budget 256 tokens), work of several requests coalesced: the
    same numbers."""
    small = make_engine(
        EngineConfig(model=str(tiny_models["student"]), device="cpu", max_batch_tokens=256)
    )
    loop.run_until_complete(small.start())
    try:
        inputs, _ = trainer_batch(2)
        halves = [inputs[::2], inputs[1::2]]

        async def concurrent(eng):
            return await asyncio.gather(*(eng.score(h) for h in halves))

        engine.prefix_sharing = False
        want = loop.run_until_complete(concurrent(engine))
        got = loop.run_until_complete(concurrent(small))
        for half, a_res, b_res in zip(halves, got, want, strict=True):
            for inp, a, b in zip(half, a_res, b_res, strict=True):
                assert_same(a, b, inp)
    finally:
        engine.prefix_sharing = True
        loop.run_until_complete(small.shutdown())


def test_switch_off_is_the_plain_path(loop, engine, monkeypatch):
    inputs, _ = trainer_batch(3)
    tokens = forwarded_tokens(engine, monkeypatch)
    engine.prefix_sharing = False
    try:
        loop.run_until_complete(engine.score(inputs))
    finally:
        engine.prefix_sharing = True
    # plain: every sequence whole (padded to its batch's longest)
    assert sum(tokens) >= sum(len(inp.token_ids) for inp in inputs)


def test_sliding_window_models_keep_the_plain_path(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from services.engine.hf.model import _plain_dynamic_cache

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=16,
    )
    assert not _plain_dynamic_cache(MistralForCausalLM(config))
    config.sliding_window = None
    assert _plain_dynamic_cache(MistralForCausalLM(config))


def test_teacher_setting_turns_it_off(tiny_models, monkeypatch):
    from fastapi.testclient import TestClient

    from services.common.settings import parse_settings
    from services.teacher.app import TeacherSettings, build_app

    monkeypatch.delenv("OPD_PREFIX_SHARING", raising=False)
    assert parse_settings(TeacherSettings, ["--model", "m"]).prefix_sharing is True
    settings = parse_settings(
        TeacherSettings,
        ["--model", str(tiny_models["student"]), "--device", "cpu", "--no-prefix-sharing"],
    )
    assert settings.prefix_sharing is False
    eng = make_engine(settings.engine_config())
    with TestClient(build_app(settings, engine=eng)) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert eng.prefix_sharing is False and eng.scheduler.prefix_sharing is False
        inputs, _ = trainer_batch(4)
        body = {"sequences": [{"token_ids": i.token_ids, "start": i.start} for i in inputs[:4]]}
        assert client.post("/v1/score", json=body).status_code == 200


# --------------------------------------------------------------------------- vllm

VLLM_LEN = 512


@pytest.fixture(scope="module")
def vllm_engine(tiny_models):
    """The student on vLLM (the tests of test_engine_vllm use their own; this one has room
    for prefixes longer than one 128-token CPU block)."""
    from services.engine.vllm import VLLMEngine
    from tests.loop_thread import LoopThread

    runner = LoopThread()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        eng = VLLMEngine(
            EngineConfig(
                model=str(tiny_models["student"]),
                backend="vllm",
                dtype="float32",
                max_model_len=VLLM_LEN,
                enforce_eager=True,
                max_num_seqs=32,
                seed=0,
            )
        )
        runner.run(eng.start(), timeout=900)
    yield eng, runner
    runner.run(eng.shutdown())
    runner.close()


@pytest.mark.vllm
@needs_vllm
def test_vllm_prompt_path_reads_the_prefix_cache_exactly(vllm_engine, ref_model):
    from services.engine.vllm.scoring import prefix_stats, set_prefix_sharing

    eng, runner = vllm_engine
    cache_config = eng.llm.vllm_config.cache_config
    assert cache_config.enable_prefix_caching
    block = cache_config.block_size
    inputs, context = trainer_batch(
        5, context=2 * block + 20, question=30, completion=12, tempered=False
    )
    # one tempered sequence (per-position requests; its top-k from the prompt path)
    inputs.append(
        ScoreInput(
            inputs[0].token_ids[: inputs[0].start + 4], inputs[0].start, top_k=3, temperature=0.7
        )
    )
    # later: new sequences after the same context, scored from the prompt's end (the cached
    # context is used) and from before the first block's end (a hit would hide scored rows)
    rng = np.random.default_rng(6)
    tail = rng.integers(3, 500, 40).tolist()
    ctx = inputs[0].token_ids[:context]
    later = [ScoreInput(ctx + tail, context + 30, top_k=3), ScoreInput(ctx + tail, block - 10)]

    def run(batch, on):
        set_prefix_sharing(eng, on)
        before = dict(vars(prefix_stats(eng)))
        try:
            results = runner.run(eng.score(batch))
        finally:
            set_prefix_sharing(eng, True)
        after = vars(prefix_stats(eng))
        return results, {k: after[k] - before[k] for k in after}

    shared, stats = run(inputs, True)  # first: nothing of this batch is cached yet
    assert stats["cached_tokens"] >= block  # sequences hit blocks others computed
    plain, _ = run(inputs, False)  # never reads the cache: the old path
    shared_later, stats_later = run(later, True)
    plain_later, _ = run(later, False)
    assert stats_later["cached_tokens"] >= 2 * block and stats_later["reruns"] >= 1
    for inp, a, b in zip(inputs + later, shared + shared_later, plain + plain_later, strict=True):
        assert_same(a, b, inp, atol=1e-5)
        target, ids, vals = ref_score(ref_model, inp)
        np.testing.assert_allclose(a.logprobs, target, atol=1e-4, rtol=0)
        if inp.top_k:
            np.testing.assert_allclose(a.top_logprobs, vals[:, : inp.top_k], atol=1e-4, rtol=0)
