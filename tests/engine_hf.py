"""Shared by the hf engine's tests (tests/test_engine_hf*.py): the module-scoped event loop,
starting an engine on it, the prompts, and the reference logprobs of a direct forward.

A test module takes the fixtures (`loop`, `tok`, `prompt_ids`) by importing them and listing
them in `__all__`; each module gets its own instance.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from services.engine import EngineConfig, make_engine
from services.engine.hf import HFEngine


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _start_on(loop, model_dir: Path, device: str, **kw) -> HFEngine:
    engine = make_engine(EngineConfig(model=str(model_dir), device=device, **kw))
    assert isinstance(engine, HFEngine)
    loop.run_until_complete(engine.start())
    return engine


def _start(loop, model_dir: Path, **kw) -> HFEngine:
    return _start_on(loop, model_dir, "cpu", **kw)


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["student"]))


def ref_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[len(ids), V] float32 log-softmax of logits / T; row j predicts ids[j + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def ref_token_logprobs(model, ids: list[int], start: int, temperature: float = 1.0) -> np.ndarray:
    lp = ref_logprobs(model, ids, temperature)
    targets = torch.tensor(ids[start:])
    return lp[start - 1 : len(ids) - 1].gather(1, targets[:, None])[:, 0].numpy()


PROMPTS = [
    "Tom has 3 apples and buys 4 more.",
    "How many",
    "Ana has 12 books and buys 30 more. How many books does Ana have?",
]


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[list[int]]:
    return [tok.encode(p) for p in PROMPTS]
