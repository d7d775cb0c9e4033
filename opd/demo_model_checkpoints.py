"""The demo checkpoints on disk: the teacher written as a plain transformers checkpoint, and
its depth-pruned student; each entry written atomically with a metadata file.

Weights are stored as float32 (see :mod:`opd.demo_models` for why). An entry is complete when
its `opd_demo.json` and `config.json` exist; it is built in a temporary directory beside its
final place and renamed into place, so a crash or a concurrent build never leaves a
half-written model where a reader would use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from opd.demo_model_sources import TEACHER_REPO, TOKENIZER_FILES, load_teacher_parts

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "DType",
    "atomic_dir",
    "is_complete",
    "read_meta",
    "write_student",
    "write_teacher",
]

log = logging.getLogger("opd.demo_models")

# Bump when the layout or the conversion changes: old cache entries are then ignored.
FORMAT_VERSION = 1
META_FILE = "opd_demo.json"

DType = Literal["float32", "bfloat16"]


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success rename it to `final`.

    When `final` appeared meanwhile (another process won the race) the temporary copy is
    dropped; on an error it is removed and the error propagates.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
            log.info("%s was prepared concurrently; keeping that copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """0755 directories, 0644 files: safetensors writes 0600 files, and the services that
    read the checkpoints may run as other users (shared volumes)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "config.json").is_file()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _torch_dtype(dtype: DType) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _clean_config_dict(config: Any, dtype: DType) -> dict[str, Any]:
    """A plain Llama config dict: no GGUF/private leftovers, tidy eps, the stored dtype."""
    data = config.to_dict()
    for key in list(data):
        if key.startswith("_") or key in (
            "transformers_version",
            "torch_dtype",
            "quantization_config",
        ):
            data.pop(key)
    eps = data.get("rms_norm_eps")
    if isinstance(eps, float):
        # GGUF stores eps as float32 (1e-5 -> 9.999999747378752e-06); the hub config says 1e-05.
        data["rms_norm_eps"] = float(f"{eps:.6g}")
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype"] = dtype
    return data


def _save_checkpoint(model: Any, tokenizer: Any, generation_config: Any, out: Path) -> None:
    """save_pretrained (safetensors) + tokenizer (chat template included) + generation config."""
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if generation_config is not None:
        generation_config.save_pretrained(str(out))


def _build_from_state(config_dict: dict[str, Any], state: dict[str, Any], dtype: DType) -> Any:
    """A fresh model built from the config, weights loaded with `load_state_dict(strict)`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    try:  # skip the random init: every tensor is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_torch_dtype(dtype))
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    expected = set(model.state_dict())
    given = {k: v for k, v in state.items() if k in expected}
    missing = expected - set(given)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"demo model weights miss tensors: {sorted(missing)[:5]}")
    model.load_state_dict(given, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(_torch_dtype(dtype))
    model.eval()
    return model


def write_teacher(
    out: Path, source: str, path: Path, dtype: DType, provenance: dict[str, Any]
) -> None:
    tokenizer, (config, generation), state = load_teacher_parts(source, path)
    config_dict = _clean_config_dict(config, dtype)
    model = _build_from_state(config_dict, state, dtype)
    _fix_generation_config(generation, config_dict)
    # The GGUF tokenizer says "no limit" (1e30); the hub's says the context length.
    tokenizer.model_max_length = int(config_dict.get("max_position_embeddings") or 8192)
    _save_checkpoint(model, tokenizer, generation, out)
    write_meta(
        out,
        {
            "role": "teacher",
            "format_version": FORMAT_VERSION,
            "model": TEACHER_REPO,
            "dtype": dtype,
            "num_hidden_layers": config_dict["num_hidden_layers"],
            **provenance,
        },
    )


def _fix_generation_config(generation: Any, config_dict: dict[str, Any]) -> None:
    """Generation defaults that agree with the config (eos/bos/pad ids)."""
    if generation is None:
        return
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, key, None) is None and config_dict.get(key) is not None:
            setattr(generation, key, config_dict[key])
    generation._from_model_config = False


def write_student(teacher_dir: Path, out: Path, keep: tuple[int, ...], dtype: DType) -> None:
    """Depth-prune the teacher checkpoint: keep layers `keep`, renumbered 0..len(keep)-1."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    config_dict = json.loads((teacher_dir / "config.json").read_text())
    config_dict.pop("transformers_version", None)
    state: dict[str, Any] = {}
    for file in sorted(teacher_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    renumber = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    pruned: dict[str, Any] = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match is None:
            pruned[name] = tensor
        elif int(match.group(1)) in renumber:
            pruned[f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    config_dict["num_hidden_layers"] = len(keep)
    if isinstance(config_dict.get("layer_types"), list):
        config_dict["layer_types"] = [config_dict["layer_types"][i] for i in keep]
    config_dict["dtype"] = dtype
    model = _build_from_state(config_dict, pruned, dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    # Tokenizer files are copied byte for byte: the fingerprints are equal by construction.
    for name in TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    if (teacher_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(teacher_dir)).save_pretrained(str(out))
    teacher_meta = read_meta(teacher_dir)
    write_meta(
        out,
        {
            "role": "student",
            "format_version": FORMAT_VERSION,
            "model": f"{TEACHER_REPO} (depth-pruned)",
            "dtype": dtype,
            "teacher_dir": str(teacher_dir),
            "teacher_source": teacher_meta.get("source"),
            "kept_layers": list(keep),
            "num_hidden_layers": len(keep),
            "teacher_num_hidden_layers": teacher_meta.get("num_hidden_layers"),
        },
    )
