"""Safetensors checkpoint validation: the one place that decides whether a checkpoint fits.

A weight update must be refused *before* any byte of it reaches the model, so a checkpoint
directory is checked from the safetensors headers alone, without loading tensor data. The
headers are read with `safetensors.safe_open` (which maps the file and checks the header, the
dtypes and that the tensors tile the data exactly), i.e. by the same code the loaders use, so
a file that passes here loads there. When it refuses a file, the message says which of the
common cases it is: not safetensors at all, truncated, or trailing bytes.

A spec is `{tensor name: (shape, dtype)}`; dtypes are compared in safetensors' spelling
(`F32`, `BF16`); torch-style names (`float32`, `torch.bfloat16`) are accepted wherever a dtype
is given (`services.engine.dtypes`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from services.engine.base import WeightsError
from services.engine.dtypes import canonical_dtype

INDEX_FILE = "model.safetensors.index.json"
# A header is a few hundred bytes per tensor; anything this large is garbage, not a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024

Shape = tuple[int, ...]
Spec = Mapping[str, tuple[Shape, str]]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it."""

    shape: Shape
    dtype: str  # safetensors code: F32, BF16, ...
    file: Path


class CheckpointSpec(dict[str, tuple[Shape, str]]):
    """`{name: (shape, dtype)}` of the tensors a checkpoint must contain, plus `optional`.

    `optional` holds tensors a checkpoint *may* carry but need not: the output projection of a
    model with tied embeddings (transformers drops it on save, a raw `state_dict()` dump keeps
    it). It is an attribute so the object can still be passed wherever a plain spec dict is
    expected.
    """

    def __init__(
        self,
        required: Mapping[str, tuple[Shape, str]] | None = None,
        optional: Mapping[str, tuple[Shape, str]] | None = None,
    ) -> None:
        super().__init__(required or {})
        self.optional: dict[str, tuple[Shape, str]] = dict(optional or {})


def _diagnose(path: Path, library_error: str) -> str:
    """Why `safe_open` refused a file, in words a client can act on."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return (f"not a safetensors file ({size} bytes, shorter than the 8-byte header "
                    "length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > MAX_HEADER_BYTES:
            return f"not a safetensors file (header length {header_len} is not plausible)"
        if 8 + header_len > size:
            return (f"truncated: header says {header_len} bytes but the file has only "
                    f"{size - 8} after the length prefix")
        raw = f.read(header_len)
    if "not fully covered" in library_error:
        # The tensors do not tile the data region exactly: tell a short file from a long one.
        data = size - 8 - header_len
        try:
            header = json.loads(raw)
            end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            end = None
        if isinstance(end, int) and end > data:
            return (f"truncated: the tensors need {end} data bytes but the file holds only "
                    f"{data}")
        if isinstance(end, int):
            return f"{data - end} bytes after the last tensor (corrupt file)"
    reason = library_error.removeprefix("Error while deserializing header: ")
    return f"not a safetensors file (bad header: {reason})"


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors one safetensors file declares, without reading their data.

    Raises `WeightsError` when the file is unreadable, not safetensors, truncated (header or
    data), or its offsets do not match the shapes and dtypes it declares.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                view = f.get_slice(name)
                tensors[name] = TensorInfo(tuple(view.get_shape()), view.get_dtype(), path)
            return tensors
    except SafetensorError as exc:
        try:
            reason = _diagnose(path, str(exc))
        except OSError as os_exc:
            reason = f"cannot read: {os_exc.strerror or os_exc}"
        raise WeightsError(f"{path.name}: {reason}") from exc
    except OSError as exc:
        raise WeightsError(f"{path.name}: cannot read: {exc.strerror or exc}") from exc


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


def read_checkpoint_headers(directory: str | Path) -> tuple[list[Path], dict[str, TensorInfo]]:
    """All tensors of a checkpoint directory: `(files, {name: TensorInfo})`.

    Raises `WeightsError` for a missing directory, no safetensors files, a bad file, or a
    tensor stored in two files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"checkpoint directory {str(directory)!r} does not exist")
    files = _checkpoint_files(directory)
    if not files:
        raise WeightsError(f"no .safetensors files in {str(directory)!r}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise WeightsError(
                    f"tensor {name!r} appears in both {tensors[name].file.name} and {file.name}"
                )
            tensors[name] = info
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
    check_layout({name: (info.shape, info.dtype) for name, info in tensors.items()},
                 expected, optional)
    return files


def check_layout(
    tensors: Mapping[str, tuple[Shape, str]],
    expected: Spec,
    optional: Spec | None = None,
) -> None:
    """Check that `{name: (shape, dtype)}` holds exactly the `expected` tensors.

    The checks of `validate_checkpoint_dir` without the files (a broadcast's manifest):
    `WeightsError` naming the first kind of problem found (missing names, unknown names,
    wrong shapes, wrong dtypes); dtypes in any spelling `canonical_dtype` knows.
    """
    allowed: dict[str, tuple[Shape, str]] = dict(getattr(expected, "optional", {}) or {})
    allowed.update(optional or {})
    allowed.update(expected)

    missing = set(expected) - set(tensors)
    if missing:
        raise WeightsError(f"checkpoint is missing {len(missing)} tensor(s): {_listing(missing)}")
    unknown = set(tensors) - set(allowed)
    if unknown:
        raise WeightsError(f"checkpoint has {len(unknown)} unknown tensor(s): {_listing(unknown)}")
    for name, (shape, _) in sorted(tensors.items()):
        want_shape = tuple(allowed[name][0])
        if tuple(shape) != want_shape:
            raise WeightsError(f"tensor {name!r} has shape {tuple(shape)}, expected {want_shape}")
    for name, (_, dtype) in sorted(tensors.items()):
        want_dtype = canonical_dtype(allowed[name][1])
        try:
            got = canonical_dtype(dtype)
        except ValueError:  # a code this project does not know cannot be the expected one
            got = str(dtype)
        if got != want_dtype:
            raise WeightsError(f"tensor {name!r} has dtype {got}, expected {want_dtype}")


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
    required = {name: (info.shape, info.dtype) for name, info in tensors.items()}
    optional: dict[str, tuple[Shape, str]] = {}
    if _tied_embeddings(model_dir):
        for name, (shape, dtype) in required.items():
            # `model.embed_tokens.weight` -> `lm_head.weight`; a prefixed wrapper
            # (`model.language_model.embed_tokens.weight`) keeps lm_head at the top level.
            if name.endswith("embed_tokens.weight") and "lm_head.weight" not in required:
                optional["lm_head.weight"] = (shape, dtype)
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


@dataclass(frozen=True)
class ReferenceCheckpoint:
    """The initial checkpoint every weight update is checked against.

    `spec` is None (and `error` says why) when weight updates are impossible: no local copy of
    the model, or an initial checkpoint that is not safetensors.
    """

    spec: CheckpointSpec | None
    model_dir: Path | None
    error: str | None = None


def reference_checkpoint(model: str) -> ReferenceCheckpoint:
    """Read the initial checkpoint's layout for `model` (a local path or a cached hub id)."""
    model_dir = resolve_model_dir(model)
    if model_dir is None:
        return ReferenceCheckpoint(
            None, None,
            f"no local copy of {model!r} to read tensor names, shapes and dtypes from",
        )
    try:
        return ReferenceCheckpoint(expected_spec_from_checkpoint(model_dir), model_dir)
    except WeightsError as exc:
        return ReferenceCheckpoint(None, model_dir, f"initial checkpoint {str(model_dir)!r}: {exc}")
