"""Sampling math of the hf backend, vLLM's `logprobs_mode="processed_logprobs"`.

For each row, per step: `l = logits.float() / T`; top-k then top-p filtering exactly as vLLM
does (top-k keeps every token whose logit ties the k-th largest; top-p masks, in ascending
order, the tokens whose cumulative probability is <= 1 - p, always keeping the most likely);
`lp = log_softmax(l)` in float32 over the *filtered* logits (filtered tokens get -inf). The
sampled token's reported logprob is `lp[token]`, i.e. its logprob under the distribution
actually sampled from (post-temperature, post-filter, renormalised), and the `top_logprobs`
alternatives are the top entries of the same `lp` (so, as in vLLM, they can hold -inf when more
are asked for than the filter kept). With `top_p=1, top_k=-1` (the trainer's setting) this is
exactly `log_softmax(logits / T)`. Greedy (`T < 1e-5`, as in vLLM) takes `argmax(logits)` and
reports `log_softmax(logits)` (temperature 1, unfiltered). Sampling draws `q ~ Exp(1)` per
vocabulary entry and takes `argmax(probs / q)` (an exact draw from `probs`).

Seeds: each row of a seeded request has its own `torch.Generator`, seeded from
`(seed, prompt_index, sample_index)` (`row_seed`) and drawn from only by that row, once per
step; unseeded rows share their group's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..base import SamplingSpec

LOGPROBS_MODE = "processed_logprobs"
"""vLLM `logprobs_mode` whose semantics this backend reproduces (see the module docstring)."""

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`)."""


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) what vLLM's top-k / top-p filter masks, row by row.

    `top_k[i] <= 0` or `>= vocab` and `top_p[i] >= 1` mean "off" for row `i`. Top-k keeps every
    token whose logit is >= the k-th largest (ties kept); top-p then sorts ascending, masks the
    tokens whose cumulative probability is <= 1 - p, and always keeps the most likely token.
    Returns a new tensor; `logits` is not modified.
    """
    vocab = logits.shape[-1]
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        use_k = (top_k > 0) & (top_k < vocab)
        k = torch.where(use_k, top_k, torch.full_like(top_k, vocab))
        threshold = sorted_logits.gather(1, (vocab - k).unsqueeze(1).long())
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        mask = (cumulative <= (1.0 - top_p).unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        mask[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of one row of a seeded request (well mixed, in [0, 2**63))."""
    state = np.random.SeedSequence([seed & (2**64 - 1), prompt_index, sample_index])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


@dataclass
class RowSampling:
    """Per-row sampling parameters of a generation batch, as tensors on the model's device."""

    temperature: torch.Tensor  # float32 [rows]; 1 for greedy rows
    top_k: torch.Tensor  # long [rows]; 0 = off
    top_p: torch.Tensor  # float32 [rows]; 1 = off
    greedy: torch.Tensor  # bool [rows]
    use_k: bool
    use_p: bool
    all_greedy: bool
    any_greedy: bool
    max_top: int  # most `top_logprobs` any row asks for

    @classmethod
    def from_specs(
        cls, specs: Sequence[SamplingSpec], vocab_size: int, device: torch.device | None
    ) -> RowSampling:
        """The parameters of rows sampled with `specs` (one spec per row)."""
        greedy = [s.temperature < SAMPLING_EPS for s in specs]
        # Greedy rows sample at T=1 without filtering (vLLM resets top_p/top_k for them).
        temps = [1.0 if g else s.temperature for s, g in zip(specs, greedy, strict=True)]
        ks = [0 if g or s.top_k < 0 else s.top_k for s, g in zip(specs, greedy, strict=True)]
        ps = [1.0 if g else s.top_p for s, g in zip(specs, greedy, strict=True)]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.long, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            use_k=any(0 < k < vocab_size for k in ks),
            use_p=any(p < 1.0 for p in ps),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            max_top=max(s.top_logprobs for s in specs),
        )

    def select(self, idx: torch.Tensor) -> None:
        """Keep only rows `idx` (rows leave a batch as they finish)."""
        self.temperature = self.temperature[idx]
        self.top_k = self.top_k[idx]
        self.top_p = self.top_p[idx]
        self.greedy = self.greedy[idx]


def sample(
    logits: torch.Tensor,
    params: RowSampling,
    shared: torch.Generator | None,
    per_row: Sequence[torch.Generator | None],
) -> tuple[list[int], list[float], list[list[float]], list[list[int]]]:
    """Sample one token per row of float32 `logits`.

    Draws from `shared` when given, else from each row's own generator. Returns the tokens,
    their processed logprobs, and the top alternatives (values, ids) of the same processed
    distribution (`params.max_top` of them; empty lists when none are asked for).
    """
    scaled = logits / params.temperature.unsqueeze(1)
    scaled = apply_top_k_top_p(
        scaled, params.top_k if params.use_k else None, params.top_p if params.use_p else None
    )
    logprobs = torch.log_softmax(scaled, dim=-1)
    if params.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        noise = torch.empty_like(probs)
        if shared is not None:
            noise.exponential_(generator=shared)
        else:
            for i, generator in enumerate(per_row):
                noise[i].exponential_(generator=generator)
        tokens = (probs / noise).argmax(dim=-1)
        if params.any_greedy:
            tokens = torch.where(params.greedy, logits.argmax(dim=-1), tokens)
    token_lp = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if params.max_top > 0:
        vals, idx = torch.topk(logprobs, params.max_top, dim=-1)
        top_vals, top_ids = vals.tolist(), idx.tolist()
    return tokens.tolist(), token_lp.tolist(), top_vals, top_ids
