"""The hf engine's weight loading against direct transformers forwards (CPU, tiny random Llama):
sharded checkpoints, refusals that keep the old weights, tied embeddings, an update while a
generation runs. Each test starts its own engine (a load changes it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.engine import SamplingSpec, ScoreInput, WeightsError
from tests.engine_hf import _start, loop, prompt_ids, ref_token_logprobs, tok

__all__ = ["loop", "prompt_ids", "tok"]  # the shared module-scoped fixtures (`tok` for prompt_ids)


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _score_now(loop, eng, ids):
    return loop.run_until_complete(eng.score([ScoreInput(ids, 1)]))[0].logprobs


def test_load_weights_happy_path(loop, tiny_models, tmp_path, prompt_ids):
    eng = _start(loop, tiny_models["student"])
    try:
        ids = prompt_ids[2]
        before = _score_now(loop, eng, ids)
        torch.manual_seed(0)
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in _state(tiny_models["student"]).items()}
        ckpt = tmp_path / "step-1"
        ckpt.mkdir()
        names = sorted(state)
        save_file({k: state[k] for k in names[: len(names) // 2]}, str(ckpt / "a.safetensors"))
        save_file({k: state[k] for k in names[len(names) // 2 :]}, str(ckpt / "b.safetensors"))
        loop.run_until_complete(eng.load_weights(str(ckpt)))
        after = _score_now(loop, eng, ids)
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_models["student"]), dtype=torch.float32).eval()
        ref.load_state_dict(state)
        np.testing.assert_allclose(after, ref_token_logprobs(ref, ids, 1), atol=1e-4)
        assert np.abs(after - before).max() > 1e-3
    finally:
        loop.run_until_complete(eng.shutdown())


@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "dtype", "garbage", "empty", "nodir"])
def test_load_weights_refusals_keep_old_weights(loop, tiny_models, tmp_path, prompt_ids, fault):
    eng = _start(loop, tiny_models["student"])
    try:
        ids = prompt_ids[2]
        before = _score_now(loop, eng, ids)
        state = {k: v + 1.0 for k, v in _state(tiny_models["student"]).items()}
        victim = "model.layers.0.self_attn.q_proj.weight"
        if fault == "missing":
            del state[victim]
        elif fault == "extra":
            state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        elif fault == "shape":
            state[victim] = state[victim][:-1].contiguous()
        elif fault == "dtype":
            state[victim] = state[victim].to(torch.bfloat16)
        ckpt = tmp_path / "bad"
        ckpt.mkdir()
        if fault == "garbage":
            (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
        elif fault == "nodir":
            ckpt = tmp_path / "does-not-exist"
        elif fault != "empty":
            save_file(state, str(ckpt / "model.safetensors"))
        with pytest.raises(WeightsError) as info:
            loop.run_until_complete(eng.load_weights(str(ckpt)))
        if fault in ("missing", "shape", "dtype"):
            assert victim in str(info.value)
        if fault == "extra":
            assert "model.layers.9.mlp.up_proj.weight" in str(info.value)
        np.testing.assert_array_equal(_score_now(loop, eng, ids), before)
    finally:
        loop.run_until_complete(eng.shutdown())


def test_load_weights_tied_embeddings(loop, tmp_path, tiny_models):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(tmp_path / "tied"))
    AutoTokenizer.from_pretrained(str(tiny_models["tokenizer"])).save_pretrained(str(tmp_path / "tied"))
    eng = _start(loop, tmp_path / "tied")
    try:
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        state["model.embed_tokens.weight"] += 0.1
        (tmp_path / "ck").mkdir()
        save_file(state, str(tmp_path / "ck" / "model.safetensors"))
        loop.run_until_complete(eng.load_weights(str(tmp_path / "ck")))
        assert torch.equal(eng.model.lm_head.weight, state["model.embed_tokens.weight"])
    finally:
        loop.run_until_complete(eng.shutdown())


def test_weight_update_waits_for_running_generation(loop, tiny_models, tmp_path, prompt_ids):
    eng = _start(loop, tiny_models["student"])
    try:
        ids = prompt_ids[0]
        state = {k: v + 0.5 for k, v in _state(tiny_models["student"]).items()}
        (tmp_path / "ck").mkdir()
        save_file(state, str(tmp_path / "ck" / "model.safetensors"))
        old = AutoModelForCausalLM.from_pretrained(str(tiny_models["student"]), dtype=torch.float32).eval()

        async def scenario():
            gen = asyncio.create_task(
                eng.generate([ids], SamplingSpec(max_tokens=60, temperature=0.0, ignore_eos=True))
            )
            await asyncio.sleep(0.02)
            await eng.load_weights(str(tmp_path / "ck"))
            return await gen

        (sample,) = loop.run_until_complete(scenario())[0]
        # every token of the trajectory came from the old weights
        ref = ref_token_logprobs(old, ids + sample.token_ids, len(ids))
        np.testing.assert_allclose(sample.logprobs, ref, atol=1e-4)
        assert eng.model.lm_head.weight[0, 0].item() == pytest.approx(state["lm_head.weight"][0, 0].item())
    finally:
        loop.run_until_complete(eng.shutdown())
