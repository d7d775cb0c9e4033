"""The engine layer: one interface (`Engine`), two backends (`hf`, `vllm`), shared helpers.

Backends are imported lazily: importing this package pulls in neither torch/transformers (hf)
nor vllm, so the trainer can use the wire types and `tokenizer_fingerprint` cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    Engine,
    EngineConfig,
    EngineInfo,
    EngineRequestError,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
    WeightsError,
)
from .fingerprint import fingerprint_components, fingerprint_mismatch, tokenizer_fingerprint

if TYPE_CHECKING:
    from .hf import HFEngine
    from .vllm import VLLMEngine

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineInfo",
    "EngineRequestError",
    "GeneratedSample",
    "HFEngine",
    "SamplingSpec",
    "ScoreInput",
    "ScoreResult",
    "VLLMEngine",
    "WeightsError",
    "fingerprint_components",
    "fingerprint_mismatch",
    "make_engine",
    "tokenizer_fingerprint",
]


def make_engine(config: EngineConfig) -> Engine:
    """The engine for `config.backend` (not started: call `await engine.start()`)."""
    if config.backend == "hf":
        from .hf import HFEngine

        return HFEngine(config)
    if config.backend == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(config)
    raise ValueError(f"unknown engine backend {config.backend!r} (expected 'hf' or 'vllm')")


def __getattr__(name: str) -> Any:
    # Lazy backend classes: `from services.engine import HFEngine` imports torch only then.
    if name == "HFEngine":
        from .hf import HFEngine

        return HFEngine
    if name == "VLLMEngine":
        from .vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
