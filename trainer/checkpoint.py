"""Atomic, resumable checkpoints.

Layout of ``RUN_DIR/checkpoints/step-000012/``::

    model/               a transformers checkpoint: config.json, model.safetensors (or shards
                         + index), generation_config.json, tokenizer files. Loadable by
                         AutoModelForCausalLM.from_pretrained and servable by vLLM.
    optimizer.pt         optimizer and LR-scheduler state (parameter names, not ids)
    rng.pt               python / numpy / torch (/ cuda) RNG states of every rank
    trainer_state.json   step, policy version, data-sampler cursor, the resolved config

Weights are stored in the training (master) dtype, so a resumed run continues bit for bit;
``config.json`` names the dtype the student was published in, so vLLM and
``from_pretrained(dtype="auto")`` serve it as before.

Atomicity: everything is written into ``checkpoints/.tmp-step-000012-<pid>/`` and renamed to
``step-000012`` with one ``os.replace``. A crash at any moment leaves either no
``step-000012`` or a complete one; stray ``.tmp-*`` directories are ignored and cleaned up.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "Checkpoint",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "write_hf_model",
    "write_safetensors",
]

CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoints_root(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first (temp dirs are skipped)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable (POSIX); not possible everywhere, and harmless to skip.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(
    state: dict[str, torch.Tensor], directory: Path, name: str = "model.safetensors"
) -> Path:
    """One safetensors file of a CPU state dict (what the rollout service loads)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def write_hf_model(
    directory: Path,
    state: dict[str, torch.Tensor],
    model_config: Any,
    tokenizer: Any,
    *,
    serve_dtype: torch.dtype,
    generation_config: Any = None,
    max_shard_size: str = "5GB",
) -> None:
    """A transformers checkpoint directory from a (CPU, tied-deduplicated) state dict."""
    from huggingface_hub import save_torch_state_dict
    from huggingface_hub.serialization import _torch as hub_torch

    directory.mkdir(parents=True, exist_ok=True)
    # huggingface_hub logs one INFO line per save under a path-named logger; keep it quiet.
    hub_logger = getattr(hub_torch, "logger", None)
    if hub_logger is not None:
        hub_logger.setLevel(logging.WARNING)
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size)
    config = copy.deepcopy(model_config)
    # The dtype the model is meant to be served in (not the float32 of the master weights).
    config.dtype = serve_dtype
    config.save_pretrained(str(directory))
    if generation_config is not None:
        generation_config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, cuda)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    write_model: Any,
    trainer_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None,
    rng_states: list[dict[str, Any]],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep_last``.

    ``write_model(dir)`` writes the transformers checkpoint into ``dir`` (see
    :func:`write_hf_model`). Call on the rank that holds the gathered state (rank 0).
    Returns the final directory.
    """
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    tmp.mkdir()

    write_model(tmp / "model")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    state = {"step": step, "saved_at": time.time(), **trainer_state}
    # trainer_state.json is written last: list_checkpoints() also requires it.
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)

    if final.exists():
        # Saving the same step again (e.g. a final save after a resume): swap, then delete.
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)

    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    """A checkpoint on disk; the big parts are loaded on demand."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        """The number of completed optimizer steps."""
        return int(self.state["step"])

    @property
    def model_dir(self) -> Path:
        """The transformers checkpoint directory."""
        return self.path / "model"

    def optimizer_state(self) -> dict[str, Any] | None:
        """Optimizer + scheduler state, or None if it was not saved."""
        path = self.path / "optimizer.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def rng_states(self) -> list[dict[str, Any]]:
        """Per-rank RNG states."""
        return torch.load(self.path / "rng.pt", map_location="cpu", weights_only=False)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory (a ``step-*`` dir, or a run dir: its latest checkpoint).

    Raises:
        FileNotFoundError: no complete checkpoint there.
    """
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(
                f"no checkpoint in {path} (looked for {path / TRAINER_STATE} and "
                f"{checkpoints_root(path)}/step-*/)"
            )
        path = latest
    return Checkpoint(path=path, state=json.loads((path / TRAINER_STATE).read_text()))
