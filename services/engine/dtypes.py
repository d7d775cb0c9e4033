"""Dtype names, once for the whole project.

Three spellings meet here: config names (`float32`, `bfloat16`, also `torch.float32`), torch
dtypes, and the codes safetensors headers use (`F32`, `BF16`). Checkpoint checks compare in
the safetensors spelling; model loading wants torch dtypes.
"""

from __future__ import annotations

from typing import Any

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtypes a model may be loaded or trained in, by config name."""

# torch name -> safetensors code, for every dtype safetensors can store.
_SAFETENSORS_CODES: dict[str, str] = {
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
SAFETENSORS_DTYPES: frozenset[str] = frozenset(_SAFETENSORS_CODES.values()) | {"F4"}
"""Every dtype code a safetensors header may carry that this project knows."""


def canonical_dtype(dtype: Any) -> str:
    """`torch.float32`, `'float32'`, `'F32'`, `'f32'` -> `'F32'` (safetensors' spelling)."""
    name = str(dtype).removeprefix("torch.")
    if name.upper() in SAFETENSORS_DTYPES:
        return name.upper()
    if name.lower() in _SAFETENSORS_CODES:
        return _SAFETENSORS_CODES[name.lower()]
    raise ValueError(f"unknown dtype {dtype!r}")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` (or `"torch.bfloat16"`, or the dtype itself) -> `torch.bfloat16`.

    Raises `KeyError` for a dtype outside `TORCH_DTYPES`.
    """
    return TORCH_DTYPES[str(name).removeprefix("torch.")]
