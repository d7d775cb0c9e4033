"""Weight updates of the hf backend: read a validated checkpoint, copy it into the model.

The layout check is `services.engine.checkpoint.validate_checkpoint_dir` against the initial
checkpoint's spec, the same function and spec the rollout service's weights manager applies
first; repeating it here (headers only) guards direct callers and returns the files to read.
Every tensor is read into memory before the model is touched, so a bad file never changes it.
Parameters that share one tensor (tied embeddings) form a group of which a checkpoint needs
only one name; when it carries several, they must hold equal values.

Should the copy itself fail half-way (it cannot fail on a checkpoint that passed the checks,
but a device error can), the weights are restored from the directory they last came from,
which the caller keeps until a newer update succeeds (see `WeightsManager`).

Weights received over a broadcast (`services.student_rollout.broadcast`) arrive as in-memory
tensors: `check_tensors` applies every check `read` does (the same layout check, from the
tensors instead of headers), and `swap_in_memory` keeps those tensors (CPU staging, one
model's worth) as what a later failed copy restores, since no directory holds them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..base import WeightsError
from ..checkpoint import ReferenceCheckpoint, check_layout, validate_checkpoint_dir
from .model import ModelRunner

logger = logging.getLogger("services.engine.hf")


class ModelWeights:
    """The model's parameters as named tensors, and how to swap them for a checkpoint's."""

    def __init__(self, runner: ModelRunner, reference: ReferenceCheckpoint) -> None:
        self.runner = runner
        self.reference = reference
        # The directory the serving weights came from: what a failed copy restores.
        self.source: Path | None = reference.model_dir
        # Or, after a broadcast, the serving weights themselves (then `source` is None).
        self._kept: dict[str, torch.Tensor] | None = None
        self.broken: str | None = None
        state = runner.model.state_dict(keep_vars=True)
        by_tensor: dict[int, list[str]] = {}
        self._params: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            self._params[name] = tensor
            by_tensor.setdefault(id(tensor), []).append(name)
        self._groups: list[list[str]] = list(by_tensor.values())
        self._group_of = {name: group for group in self._groups for name in group}

    def read(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """Check `directory` and read its tensors (blocking); `WeightsError` if it does not fit."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if self.reference.spec is None:
            raise WeightsError(f"weight updates are unavailable: {self.reference.error}")
        files = validate_checkpoint_dir(directory, self.reference.spec)
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                tensors.update(load_file(str(file), device="cpu"))
            except (OSError, SafetensorError) as exc:  # changed since it was checked
                raise WeightsError(f"cannot read {file.name}: {exc}") from exc
        self.check(tensors)
        return tensors

    def check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """All checks of `read` on in-memory tensors: the initial checkpoint's names, shapes
        and dtypes (`check_layout`), then `check`; `WeightsError` if they do not fit."""
        if self.reference.spec is None:
            raise WeightsError(f"weight updates are unavailable: {self.reference.error}")
        check_layout({name: (tuple(t.shape), str(t.dtype)) for name, t in tensors.items()},
                     self.reference.spec)
        self.check(tensors)

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        """`WeightsError` unless every tensor is a parameter and tied ones hold equal values."""
        foreign = sorted(set(tensors) - set(self._group_of))
        if foreign:
            raise WeightsError(f"tensors that are not parameters of the loaded model: {foreign[:5]}")
        for group in self._groups:
            present = [n for n in group if n in tensors]
            for other in present[1:]:
                if not torch.equal(tensors[present[0]], tensors[other]):
                    raise WeightsError(f"tied tensors {present[0]!r} and {other!r} differ")

    def swap(self, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        """Copy `tensors` into the model under the runner's lock (blocking).

        On a failure part-way the previous weights are read back from `self.source` (or
        taken from the kept tensors of a broadcast); if even that fails the model is marked
        broken (`self.broken`) and `RuntimeError` is raised.
        """
        with self.runner.lock:
            try:
                self._copy(tensors)
            except Exception as exc:
                self._restore(exc)
                raise WeightsError(
                    f"copying the weights of {str(source)!r} failed ({exc}); the previous "
                    f"weights from {self._where()} were restored"
                ) from exc
        self.source, self._kept = Path(source), None

    def swap_in_memory(self, tensors: dict[str, torch.Tensor], label: str) -> None:
        """`swap` for tensors that came without a directory (a broadcast; `label` names them
        in messages): they are kept as what a later failed copy restores."""
        self.swap(tensors, label)
        self.source, self._kept = None, tensors

    def _where(self) -> str:
        return "the last broadcast (kept in memory)" if self._kept is not None else repr(
            str(self.source))

    def _copy(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for group in self._groups:
                name = next((n for n in group if n in tensors), None)
                if name is not None:
                    self._params[group[0]].copy_(tensors[name], non_blocking=False)

    def _restore(self, exc: Exception) -> None:
        """Put the weights of `self.source` back after a failed copy (lock held)."""
        logger.error("weight copy failed part-way: %s; restoring %s", exc, self._where())
        try:
            if self._kept is not None:
                self._copy(self._kept)
            elif self.source is None:
                raise RuntimeError("no directory to restore from")
            else:
                self._copy(self.read(self.source))
        except Exception as restore_exc:
            self.broken = (f"a failed weight copy left the model broken: {exc} (restoring "
                           f"{self._where()} failed too: {restore_exc})")
            raise RuntimeError(self.broken) from exc
