"""The `hf` engine backend: a transformers model behind the `Engine` interface.

It runs on any device torch supports and is the reference the `vllm` backend is tested
against. One module per concern: `engine` (the `HFEngine` class), `model` (loading and the
forward call), `scheduler` (batching all model work), `scoring`, `prefix` (scoring with
shared prefixes computed once), `generation` (with the stop rules), `sampling` (vLLM's processed logprobs, seeds) and `weights` (checkpoint updates).
"""

from __future__ import annotations

from .engine import HFEngine
from .sampling import LOGPROBS_MODE, SAMPLING_EPS, apply_top_k_top_p, row_seed

__all__ = ["LOGPROBS_MODE", "SAMPLING_EPS", "HFEngine", "apply_top_k_top_p", "row_seed"]
