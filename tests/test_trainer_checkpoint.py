"""Checkpoints: atomic (a crash mid-save leaves the previous one loadable), keep-last-K,
a loadable transformers model dir, RNG round trip; metrics truncation on resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_hf_model,
)
from trainer.observability import read_metrics, truncate_metrics


def _save(run: Path, step: int, keep_last: int = 3, write_model=None) -> Path:
    def default_writer(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"weights-%d" % step)

    return save_checkpoint(
        run,
        step,
        write_model=write_model or default_writer,
        trainer_state={"policy_version": step + 1, "sampler": {"cursor": step}},
        optimizer_state={"optimizer": {"state": {}, "step": step}},
        rng_states=[capture_rng()],
        keep_last=keep_last,
    )


def test_save_load_and_keep_last(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    ckpt = load_checkpoint(tmp_path)
    assert (
        ckpt.step == 4
        and ckpt.state["policy_version"] == 5
        and ckpt.state["sampler"] == {"cursor": 4}
    )
    assert ckpt.optimizer_state() == {"optimizer": {"state": {}, "step": 4}}
    assert (ckpt.model_dir / "model.safetensors").read_bytes() == b"weights-4"
    assert load_checkpoint(ckpt.path).step == 4  # a step dir works too
    # Saving the same step again replaces it.
    _save(tmp_path, 4, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)

    def crashing_writer(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, write_model=crashing_writer)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path).name == "step-000001"
    ckpt = load_checkpoint(tmp_path)
    assert (ckpt.model_dir / "model.safetensors").read_bytes() == b"weights-1"
    # The torn temp dir is ignored by loading and swept by the next save.
    assert list((tmp_path / "checkpoints").glob(".tmp-*"))
    _save(tmp_path, 2)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]


def test_load_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_hf_model_dir_is_loadable_and_keeps_master_precision(tiny_models, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    with torch.no_grad():
        model.lm_head.weight.add_(1e-7)  # below bf16 resolution: must survive the round trip
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_hf_model(
        tmp_path / "m",
        state,
        model.config,
        tok,
        serve_dtype=torch.bfloat16,
        generation_config=model.generation_config,
    )
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    for name, tensor in exact.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert served.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(tmp_path / "m").get_vocab() == tok.get_vocab()


def test_rng_round_trip() -> None:
    state = capture_rng()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)) + '{"step": 6, "x"'
    )
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 5)))
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path / "samples.jsonl")] == [1]
