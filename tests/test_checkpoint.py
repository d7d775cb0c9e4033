"""Checkpoint validation from safetensors headers (services/engine/checkpoint.py, dtypes.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.engine.base import WeightsError
from services.engine.checkpoint import (
    CheckpointSpec,
    expected_spec_from_checkpoint,
    read_safetensors_header,
    reference_checkpoint,
    validate_checkpoint_dir,
)
from services.engine.dtypes import canonical_dtype, torch_dtype

SPEC = {"a.weight": ((4, 3), "F32"), "b.bias": ((5,), "float32")}


def _tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(4, 3).to(dtype), "b.bias": torch.randn(5).to(dtype)}


def _write(directory: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / name))
    return directory / name


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_header_of_a_good_file(tmp_path):
    file = _write(tmp_path, _tensors())
    header = read_safetensors_header(file)
    assert set(header) == {"a.weight", "b.bias"}
    assert header["a.weight"].shape == (4, 3)
    assert header["a.weight"].dtype == "F32"
    assert header["a.weight"].file == file
    assert validate_checkpoint_dir(tmp_path, SPEC) == [file]


def test_canonical_dtype():
    assert canonical_dtype(torch.bfloat16) == "BF16"
    assert canonical_dtype("float32") == "F32"
    assert canonical_dtype("f16") == "F16"
    with pytest.raises(ValueError):
        canonical_dtype("float128")
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("torch.float32") is torch.float32
    with pytest.raises(KeyError):
        torch_dtype("int8")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a safetensors file"),
        (b"abc", "not a safetensors file"),
        (b"PK\x03\x04 this is a zip file, not safetensors" * 4, "not a safetensors file"),
        (struct.pack("<Q", 40) + b"{not json" + b" " * 31, "invalid JSON"),
        (struct.pack("<Q", 10**6) + b"{}", "truncated"),
        (struct.pack("<Q", 2) + b"[]", r"not a safetensors file \(bad header"),
    ],
)
def test_not_safetensors(tmp_path, content, message):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        read_safetensors_header(tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=message):
        validate_checkpoint_dir(tmp_path, SPEC)


@pytest.mark.parametrize("keep", [0.5, -7, -1, 9])
def test_truncated_file(tmp_path, keep):
    """A file cut anywhere (in the data, in the header, just after the length) is refused,
    and the message says it is truncated."""
    file = _write(tmp_path, _tensors())
    blob = file.read_bytes()
    file.write_bytes(blob[: int(len(blob) * keep)] if isinstance(keep, float) else blob[:keep])
    with pytest.raises(WeightsError, match="truncated"):
        validate_checkpoint_dir(tmp_path, SPEC)


def test_trailing_bytes_and_bad_offsets(tmp_path):
    file = _write(tmp_path, _tensors())
    file.write_bytes(file.read_bytes() + b"xx")
    with pytest.raises(WeightsError, match="after the last tensor"):
        read_safetensors_header(file)

    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    _raw_file(file, header, b"\0" * 8)
    with pytest.raises(WeightsError, match="invalid shape, data type, or offset"):
        read_safetensors_header(file)

    header = {
        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _raw_file(file, header, b"\0" * 12)
    with pytest.raises(WeightsError, match="invalid offset for tensor `y`"):
        read_safetensors_header(file)

    header = {"x": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}
    _raw_file(file, header, b"\0" * 8)
    with pytest.raises(WeightsError, match="unknown variant `Q9`"):
        read_safetensors_header(file)

    header = {"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}
    _raw_file(file, header, b"\0" * 8)
    with pytest.raises(WeightsError, match="not a safetensors file.*expected a sequence"):
        read_safetensors_header(file)

    header = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    _raw_file(file, header, b"\0" * 8)
    with pytest.raises(WeightsError, match="invalid offset for tensor `x`"):  # a gap
        read_safetensors_header(file)


def test_no_files_and_no_directory(tmp_path):
    with pytest.raises(WeightsError, match="no .safetensors files"):
        validate_checkpoint_dir(tmp_path, SPEC)
    with pytest.raises(WeightsError, match="does not exist"):
        validate_checkpoint_dir(tmp_path / "nope", SPEC)


def test_missing_unknown_shape_dtype(tmp_path):
    tensors = _tensors()
    del tensors["b.bias"]
    _write(tmp_path / "missing", tensors)
    with pytest.raises(WeightsError, match=r"missing 1 tensor.*'b.bias'"):
        validate_checkpoint_dir(tmp_path / "missing", SPEC)

    _write(tmp_path / "unknown", {**_tensors(), "c.extra": torch.zeros(2)})
    with pytest.raises(WeightsError, match=r"unknown tensor.*'c.extra'"):
        validate_checkpoint_dir(tmp_path / "unknown", SPEC)

    _write(tmp_path / "shape", {**_tensors(), "a.weight": torch.zeros(3, 4)})
    with pytest.raises(WeightsError, match=r"'a.weight' has shape \(3, 4\), expected \(4, 3\)"):
        validate_checkpoint_dir(tmp_path / "shape", SPEC)

    _write(tmp_path / "dtype", _tensors(torch.bfloat16))
    with pytest.raises(WeightsError, match="has dtype BF16, expected F32"):
        validate_checkpoint_dir(tmp_path / "dtype", SPEC)


def test_sharded_checkpoint(tmp_path):
    tensors = _tensors()
    _write(tmp_path, {"a.weight": tensors["a.weight"]}, "model-00001-of-00002.safetensors")
    _write(tmp_path, {"b.bias": tensors["b.bias"]}, "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.bias": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    spec = expected_spec_from_checkpoint(tmp_path)
    assert dict(spec) == {"a.weight": ((4, 3), "F32"), "b.bias": ((5,), "F32")}
    assert len(validate_checkpoint_dir(tmp_path, spec)) == 2

    # A shard named by the index but absent is a clear error, not a silent partial load.
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing"):
        validate_checkpoint_dir(tmp_path, spec)
    # An index may not point outside the directory.
    index["weight_map"]["b.bias"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="bad shard name"):
        validate_checkpoint_dir(tmp_path, spec)


def test_duplicate_tensor_across_files(tmp_path):
    _write(tmp_path, _tensors(), "one.safetensors")
    _write(tmp_path, {"b.bias": torch.zeros(5)}, "two.safetensors")
    with pytest.raises(WeightsError, match="appears in both"):
        validate_checkpoint_dir(tmp_path, SPEC)


def test_tied_embeddings(tmp_path):
    initial = tmp_path / "initial"
    _write(
        initial,
        {"model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.ones(4)},
    )
    (initial / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    spec = expected_spec_from_checkpoint(initial)
    assert isinstance(spec, CheckpointSpec)
    assert "lm_head.weight" not in spec
    assert spec.optional == {"lm_head.weight": ((8, 4), "F32")}

    # A raw state_dict dump keeps lm_head: allowed, but its shape is still checked.
    with_head = tmp_path / "with_head"
    _write(
        with_head,
        {
            "model.embed_tokens.weight": torch.zeros(8, 4),
            "model.norm.weight": torch.ones(4),
            "lm_head.weight": torch.zeros(8, 4),
        },
    )
    validate_checkpoint_dir(with_head, spec)
    validate_checkpoint_dir(initial, spec)
    _write(
        with_head,
        {
            "model.embed_tokens.weight": torch.zeros(8, 4),
            "model.norm.weight": torch.ones(4),
            "lm_head.weight": torch.zeros(4, 8),
        },
    )
    with pytest.raises(WeightsError, match="'lm_head.weight' has shape"):
        validate_checkpoint_dir(with_head, spec)

    # Untied: lm_head is an unknown name.
    (initial / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    spec = expected_spec_from_checkpoint(initial)
    assert spec.optional == {}
    _write(
        with_head,
        {
            "model.embed_tokens.weight": torch.zeros(8, 4),
            "model.norm.weight": torch.ones(4),
            "lm_head.weight": torch.zeros(8, 4),
        },
    )
    with pytest.raises(WeightsError, match="unknown tensor"):
        validate_checkpoint_dir(with_head, spec)


def test_tiny_model_spec(tiny_models):
    """The tiny student validates against its own spec (what the rollout service does)."""
    spec = expected_spec_from_checkpoint(tiny_models["student"])
    assert "lm_head.weight" in spec and "model.embed_tokens.weight" in spec
    assert all(dtype == "F32" for _, dtype in spec.values())
    validate_checkpoint_dir(tiny_models["student"], spec)


def test_reference_checkpoint(tmp_path, tiny_models):
    """What the weights manager and both backends read at start: the spec, or why not."""
    ref = reference_checkpoint(str(tiny_models["student"]))
    assert ref.error is None and ref.model_dir == tiny_models["student"].resolve()
    assert ref.spec == expected_spec_from_checkpoint(tiny_models["student"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not safetensors")
    ref = reference_checkpoint(str(tmp_path / "bin"))
    assert ref.spec is None and "no .safetensors files" in ref.error
    ref = reference_checkpoint("no-such-org/no-such-model-for-opd-tests")
    assert ref.spec is None and ref.model_dir is None and "no local copy" in ref.error
