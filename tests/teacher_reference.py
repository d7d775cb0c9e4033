"""What the teacher's HTTP tests compare against: a direct transformers forward of the teacher
checkpoint (`Reference`, the `ref` fixture), and the random token ids they score.

Shared by tests/test_teacher_http.py and tests/test_teacher_vllm.py; a module that takes
`ref` imports it and lists it in `__all__`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


class Reference:
    """Direct transformers forward of the teacher checkpoint (the spec's definition)."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size

    def logprobs(self, ids: list[int], start: int, temperature: float = 1.0,
                 top_k: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits / temperature, dim=-1)[start - 1:-1]
        values = lp.gather(1, torch.tensor(ids[start:])[:, None])[:, 0].numpy()
        if not top_k:
            return values, None, None
        top = torch.topk(lp, top_k, dim=-1)
        return values, top.indices.numpy(), top.values.numpy()


@pytest.fixture(scope="module")
def ref(tiny_models) -> Reference:
    return Reference(tiny_models["teacher"])


def _random_ids(rng: np.random.Generator, n: int, vocab: int = 512) -> list[int]:
    return rng.integers(3, vocab, size=n).tolist()  # skip specials; any id is valid
