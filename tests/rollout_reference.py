"""What the rollout service's tests compare against and push: the student in this process
(`Reference`), with the weights of any version the service served, and the weights to push.

Shared by the contract (tests/rollout_contract.py) and the weight-sync tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

API_KEY = "rollout-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Reference:
    """The student in this process, with the weights of any version the service served."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.initial = load_file(str(model_dir / "model.safetensors"))
        self.versions: dict[int, dict[str, torch.Tensor]] = {0: self.initial}
        self._loaded: int | None = None

    def use(self, version: int) -> None:
        if self._loaded != version:
            self.model.load_state_dict(self.versions[version], strict=True)
            self._loaded = version

    @torch.no_grad()
    def logprobs(
        self, version: int, prompt: list[int], completion: list[int], temperature: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(logprob of each completion token at `temperature`, argmax at each position)."""
        self.use(version)
        ids = torch.tensor([prompt + completion])
        logits = self.model(ids).logits[0, len(prompt) - 1 : -1].float()
        t = 1.0 if temperature < 1e-5 else temperature  # greedy reports temperature-1 logprobs
        lp = torch.log_softmax(logits / t, dim=-1)
        picked = lp.gather(1, torch.tensor(completion)[:, None])[:, 0]
        return picked.numpy(), logits.argmax(-1).numpy()


def perturbed(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def eos_heavy(base: dict[str, torch.Tensor], eos: int) -> dict:
    """Weights under which EOS is (numerically) certain at every position.

    A large constant in embedding dim 0 dominates the residual stream, so the final normed
    hidden state is ~ +sqrt(H) e_0; only the EOS row of lm_head reads dim 0.
    """
    sd = {k: v.clone() for k, v in base.items()}
    sd["model.embed_tokens.weight"][:, 0] = 50.0
    sd["lm_head.weight"][:, 0] = 0.0
    sd["lm_head.weight"][eos, 0] = 5.0
    return sd


def save_dir(
    directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata=metadata)
    return directory
