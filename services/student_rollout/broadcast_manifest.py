"""The manifest check of `POST /v1/weights/broadcast`: a 400 naming the entry at fault.

A broadcast's manifest must hold exactly the initial checkpoint's tensors (the reference spec
of `services.engine.checkpoint`) with their shapes and dtypes; it is checked before the
replica starts receiving, so a misfit changes nothing.
"""

from __future__ import annotations

from services.common.errors import APIError
from services.engine.base import WeightsError
from services.engine.checkpoint import CheckpointSpec, check_layout
from services.engine.dtypes import canonical_dtype
from services.protocol import BroadcastRequest


def _bad_manifest(message: str, param: str, serving: int) -> APIError:
    return APIError(
        400,
        f"{message}; still serving policy_version {serving}",
        param=param,
        code="invalid_manifest",
    )


def check_manifest(req: BroadcastRequest, spec: CheckpointSpec, serving: int) -> None:
    """400 naming the entry unless the manifest holds exactly the model's tensors."""
    allowed = {**spec.optional, **spec}
    seen: dict[str, int] = {}
    for i, t in enumerate(req.tensors):
        at = f"tensors[{i}]"
        if t.name in seen:
            raise _bad_manifest(
                f"{at}.name: {t.name!r} appears twice (also tensors[{seen[t.name]}])",
                f"tensors.{i}.name",
                serving,
            )
        seen[t.name] = i
        if t.name not in allowed:
            raise _bad_manifest(
                f"{at}.name: {t.name!r} is not a tensor of this model's checkpoint",
                f"tensors.{i}.name",
                serving,
            )
        shape, dtype = tuple(allowed[t.name][0]), canonical_dtype(allowed[t.name][1])
        if tuple(t.shape) != shape:
            raise _bad_manifest(
                f"{at}.shape: tensor {t.name!r} has shape {tuple(t.shape)}, expected {shape}",
                f"tensors.{i}.shape",
                serving,
            )
        if canonical_dtype(t.dtype) != dtype:
            raise _bad_manifest(
                f"{at}.dtype: tensor {t.name!r} has dtype {t.dtype}, expected "
                f"{dtype} (safetensors' spelling)",
                f"tensors.{i}.dtype",
                serving,
            )
    try:  # what is left: required names the manifest lacks
        check_layout({t.name: (tuple(t.shape), t.dtype) for t in req.tensors}, spec)
    except WeightsError as exc:
        raise _bad_manifest(f"tensors: {exc}", "tensors", serving) from exc
