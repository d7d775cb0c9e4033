"""The loaded transformers model of the hf backend and its one forward call.

Forwards run in worker threads (the scheduler uses `asyncio.to_thread`), one at a time, under
`lock`; a weight copy takes the same lock, so no forward ever sees half-copied weights.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch

from ..base import EngineConfig
from ..dtypes import TORCH_DTYPES
from ..tokenization import resolve_eos_ids


def resolve_device(spec: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else as torch spells it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _plain_dynamic_cache(model: Any) -> bool:
    """Whether the model's `DynamicCache` is full attention in every layer (no sliding-window,
    chunked or recurrent layers): then a prefix's keys/values can be copied into any row's
    cache (prefix sharing in scoring, see `prefix`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - a model this cannot describe keeps the plain path
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class ModelRunner:
    """A causal LM in eval mode on one device, with the facts the engine needs about it."""

    def __init__(self, config: EngineConfig, tokenizer: Any) -> None:
        """Load `config.model` (blocking: call from a worker thread)."""
        from transformers import AutoModelForCausalLM

        device = resolve_device(config.device)
        if config.dtype != "auto":
            dtype: Any = TORCH_DTYPES[config.dtype]
        elif device.type == "cpu":
            # Half precision on CPU is slow and loses the accuracy the reference is for.
            dtype = torch.float32
        else:
            dtype = "auto"  # the checkpoint's own dtype
        model = AutoModelForCausalLM.from_pretrained(
            config.model, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        self.model: Any = model
        self.device = device
        self.lock = threading.Lock()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

        out_emb = model.get_output_embeddings()
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.vocab_size = (
            int(out_emb.weight.shape[0]) if out_emb is not None else int(text_config.vocab_size)
        )
        max_len = config.max_model_len or getattr(text_config, "max_position_embeddings", None)
        if not max_len:
            tok_max = getattr(tokenizer, "model_max_length", None)
            max_len = tok_max if tok_max and tok_max < 10**8 else 2048
        self.max_model_len = int(max_len)
        self.eos_ids = resolve_eos_ids(tokenizer, getattr(model, "generation_config", None))
        self.prefix_cache_ok = _plain_dynamic_cache(model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    def check_alive(self) -> None:
        """Raise once the model has been freed (the engine shut down mid-work)."""
        if self.model is None:
            raise RuntimeError("the engine is shut down")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        logits_to_keep: int,
    ) -> tuple[torch.Tensor, Any]:
        """One model forward: logits of the last `logits_to_keep` positions and the cache.

        Callers hold `lock` and run under `torch.inference_mode()`.
        """
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
        if cache is not None:
            kwargs["past_key_values"] = cache
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(**kwargs)
        logits = out.logits
        if logits.shape[1] != logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits, out.past_key_values if cache is not None else None

    def free(self) -> None:
        """Drop the model (waits for a running forward)."""
        with self.lock:
            self.model = None
