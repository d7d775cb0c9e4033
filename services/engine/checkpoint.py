"""Safetensors checkpoint validation, shared by the rollout service and the trainer.

A weight update must be refused *before* any byte of it reaches the model, so this module
checks a checkpoint directory from the safetensors headers alone: it never loads tensor data.
The header is parsed here (8-byte little-endian length, then a JSON object) rather than by the
`safetensors` library, because we want a precise message for each way a file can be wrong
(not safetensors at all, truncated header, truncated data, inconsistent offsets) and we want it
without mapping gigabytes of data.

A spec is `{tensor name: (shape, dtype)}`; dtypes are compared in one canonical spelling
(safetensors' `F32`, `BF16`, ...), and torch-style names (`float32`, `torch.bfloat16`) are
accepted wherever a dtype is given.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from services.engine.base import WeightsError

INDEX_FILE = "model.safetensors.index.json"
# A header is a few hundred bytes per tensor; anything this large is garbage, not a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code -> bytes per element.
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
    "F4": 0.5,
}

_TORCH_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e8m0fnu": "F8_E8M0",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float": "F32",
    "int64": "I64",
    "uint64": "U64",
    "float64": "F64",
    "double": "F64",
    "complex64": "C64",
}

Shape = tuple[int, ...]
Spec = Mapping[str, tuple[Shape, str]]


class CheckpointSpec(dict[str, tuple[Shape, str]]):
    """`{name: (shape, dtype)}` of the tensors a checkpoint must contain, plus `optional`.

    `optional` holds tensors a checkpoint *may* carry but need not; today that is the output
    projection of a model with tied embeddings (transformers drops it on save, a raw
    `state_dict()` dump keeps it). It is an attribute so the object can still be passed
    wherever a plain spec dict is expected.
    """

    def __init__(
        self,
        required: Mapping[str, tuple[Shape, str]] | None = None,
        optional: Mapping[str, tuple[Shape, str]] | None = None,
    ) -> None:
        super().__init__(required or {})
        self.optional: dict[str, tuple[Shape, str]] = dict(optional or {})


def canonical_dtype(dtype: Any) -> str:
    """`torch.float32`, `'float32'`, `'F32'` -> `'F32'` (safetensors' spelling)."""
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch.") :]
    if name.upper() in DTYPE_SIZES:
        return name.upper()
    if name.lower() in _TORCH_NAMES:
        return _TORCH_NAMES[name.lower()]
    raise ValueError(f"unknown dtype {dtype!r}")


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parse and check one safetensors file's header without reading its tensor data.

    Returns `{name: {"dtype", "shape", "data_offsets"}}` (the `__metadata__` entry dropped).
    Raises `WeightsError` when the file is not safetensors, is truncated (header or data), or
    its offsets are inconsistent with the shapes and dtypes it declares.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(
                    f"{path.name}: not a safetensors file ({file_size} bytes, shorter than the "
                    "8-byte header length)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > MAX_HEADER_BYTES:
                raise WeightsError(
                    f"{path.name}: not a safetensors file (header length {header_len} is not "
                    "plausible)"
                )
            if 8 + header_len > file_size:
                raise WeightsError(
                    f"{path.name}: truncated: header says {header_len} bytes but the file "
                    f"has only {file_size - 8} after the length prefix"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise WeightsError(f"{path.name}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path.name}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path.name}: not a safetensors file (header is not a JSON object)")

    data_size = file_size - 8 - header_len
    tensors: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
        ):
            raise WeightsError(f"{path.name}: malformed header entry for tensor {name!r}")
        dtype = entry["dtype"]
        if dtype not in DTYPE_SIZES:
            raise WeightsError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise WeightsError(
                f"{path.name}: tensor {name!r} declares offsets [{begin}, {end}) but "
                f"{dtype}{entry['shape']} needs {nbytes:g} bytes"
            )
        if end > data_size:
            raise WeightsError(
                f"{path.name}: truncated: tensor {name!r} ends at byte {end} of the data but "
                f"the file holds only {data_size} data bytes"
            )
        tensors[name] = {
            "dtype": dtype,
            "shape": list(entry["shape"]),
            "data_offsets": [begin, end],
        }
        spans.append((begin, end, name))
    # The safetensors loader itself insists that tensors tile the data region exactly (no
    # gaps, no overlap, nothing after); check the same here so a file that passes validation
    # cannot fail later inside the engine.
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise WeightsError(f"{path.name}: tensor {name!r} at offset {begin} {what}")
        position = end
    if position != data_size:
        raise WeightsError(
            f"{path.name}: {data_size - position} bytes after the last tensor (corrupt file)"
        )
    return tensors


def _checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (the index's shards when one exists)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{INDEX_FILE}: unreadable or has no weight_map: {exc}") from exc
        files = []
        for shard in shards:
            # The index is input too: a shard name must not point outside the directory.
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise WeightsError(f"{INDEX_FILE}: bad shard name {shard!r}")
            if not (directory / shard).is_file():
                raise WeightsError(f"{INDEX_FILE} names shard {shard!r}, which is missing")
            files.append(directory / shard)
        return files
    return sorted(p for p in directory.glob("*.safetensors") if p.is_file())


def read_checkpoint_headers(directory: str | Path) -> tuple[list[Path], dict[str, dict[str, Any]]]:
    """All tensors of a checkpoint directory: `(files, {name: header entry + "file"})`.

    Raises `WeightsError` for a missing directory, no safetensors files, a bad file, or a
    tensor stored in two files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"checkpoint directory {str(directory)!r} does not exist")
    files = _checkpoint_files(directory)
    if not files:
        raise WeightsError(f"no .safetensors files in {str(directory)!r}")
    tensors: dict[str, dict[str, Any]] = {}
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            if name in tensors:
                raise WeightsError(
                    f"tensor {name!r} appears in both {tensors[name]['file'].name} and {file.name}"
                )
            tensors[name] = {**entry, "file": file}
    return files, tensors


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def validate_checkpoint_dir(
    directory: str | Path,
    expected: Spec,
    optional: Spec | None = None,
) -> list[Path]:
    """Check that a directory's safetensors files hold exactly the `expected` tensors.

    `expected` maps each required name to `(shape, dtype)`; `optional` (merged with
    `expected.optional` when `expected` is a `CheckpointSpec`) lists names that may appear.
    Returns the files to load. Raises `WeightsError` naming the first kind of problem found:
    no files, a bad file, missing names, unknown names, wrong shapes, wrong dtypes.
    """
    files, tensors = read_checkpoint_headers(directory)
    allowed_optional: dict[str, tuple[Shape, str]] = dict(getattr(expected, "optional", {}) or {})
    allowed_optional.update(optional or {})

    missing = set(expected) - set(tensors)
    if missing:
        raise WeightsError(f"checkpoint is missing {len(missing)} tensor(s): {_listing(missing)}")
    unknown = set(tensors) - set(expected) - set(allowed_optional)
    if unknown:
        raise WeightsError(f"checkpoint has {len(unknown)} unknown tensor(s): {_listing(unknown)}")
    for name, entry in sorted(tensors.items()):
        want_shape, _ = expected[name] if name in expected else allowed_optional[name]
        if tuple(entry["shape"]) != tuple(want_shape):
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(entry['shape'])}, expected {tuple(want_shape)}"
            )
    for name, entry in sorted(tensors.items()):
        _, want_dtype = expected[name] if name in expected else allowed_optional[name]
        if entry["dtype"] != canonical_dtype(want_dtype):
            raise WeightsError(
                f"tensor {name!r} has dtype {entry['dtype']}, expected {canonical_dtype(want_dtype)}"
            )
    return files


def _tied_embeddings(model_dir: Path) -> bool:
    """Whether the model's config ties the output projection to the input embeddings."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and "tie_word_embeddings" in text_config:
        return bool(text_config["tie_word_embeddings"])
    # transformers' PretrainedConfig default.
    return True


def expected_spec_from_checkpoint(model_dir: str | Path) -> CheckpointSpec:
    """The spec every later checkpoint of this model must match, read from its headers.

    Handles sharded checkpoints (`model.safetensors.index.json`). With tied embeddings the
    output projection is optional: required when the initial checkpoint stores it, otherwise
    allowed (with the embedding's shape and dtype) but not required.
    """
    model_dir = Path(model_dir)
    _, tensors = read_checkpoint_headers(model_dir)
    required = {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in tensors.items()}
    optional: dict[str, tuple[Shape, str]] = {}
    if _tied_embeddings(model_dir):
        for name, (shape, dtype) in required.items():
            if name.endswith("embed_tokens.weight"):
                # `model.embed_tokens.weight` -> `lm_head.weight`; a prefixed wrapper
                # (`model.language_model.embed_tokens.weight`) keeps lm_head at the top level.
                head = "lm_head.weight"
                if head not in required:
                    optional[head] = (shape, dtype)
        # Some exports keep only lm_head; then the embedding may come back too.
        if "lm_head.weight" in required and not any(
            n.endswith("embed_tokens.weight") for n in required
        ):
            optional["model.embed_tokens.weight"] = required["lm_head.weight"]
    return CheckpointSpec(required, optional)


def resolve_model_dir(model: str) -> Path | None:
    """The local directory holding a model's initial checkpoint: the path itself, or its copy
    in the Hugging Face cache (the engine has downloaded it by the time this is asked)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]
            )
        )
    except Exception:  # noqa: BLE001 - any failure means "no local copy"; the caller reports
        return None
