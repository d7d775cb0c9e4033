"""Pushing the trainer's weights to the rollout service, and keeping them there.

:class:`WeightSync` owns the version counter and the files; how one directory of weights
reaches the service is a :class:`WeightTransport`, one class per ``sync.method``:

* :class:`LoadTransport` -- the weights are written into a directory both sides see and the
  service is asked to load the path (``POST /v1/weights/load``);
* :class:`UploadTransport` -- the safetensors file is streamed as the body of
  ``PUT /v1/weights``.

``sync.method: auto`` starts with ``load`` when a shared directory is configured and falls
back to ``upload`` for good the first time the service refuses the path.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from trainer.clients import RolloutClient, ServiceError

__all__ = [
    "WEIGHTS_FILE",
    "LoadTransport",
    "UploadTransport",
    "WeightSync",
    "WeightTransport",
    "make_transport",
]

log = logging.getLogger("opd.trainer.weight_sync")

WEIGHTS_FILE = "model.safetensors"


class WeightTransport(abc.ABC):
    """How a directory holding ``model.safetensors`` becomes the service's weights."""

    #: the ``sync.method`` this transport implements
    name: Literal["load", "upload"]

    def __init__(self, rollout: RolloutClient, root: Path) -> None:
        """``root``: where :class:`WeightSync` writes the directories this transport sends."""
        self.rollout = rollout
        self.root = root

    @abc.abstractmethod
    def send(self, directory: Path, version: int) -> None:
        """Make the service serve the weights in ``directory`` as ``version``.

        Raises:
            ServiceError: the service refused (409: the version is not newer than its own).
        """


class LoadTransport(WeightTransport):
    """``POST /v1/weights/load {path, version}``: the service reads the path from its disk."""

    name = "load"

    def __init__(self, rollout: RolloutClient, root: Path, service_dir: str | None = None):
        """``service_dir``: ``root`` as the service sees it (containers); default: ``root``."""
        super().__init__(rollout, root)
        self.service_dir = service_dir

    def send(self, directory: Path, version: int) -> None:
        """Ask the service to load ``directory`` (mapped into its view of the disk)."""
        if self.service_dir:
            path = str(Path(self.service_dir) / directory.relative_to(self.root))
        else:
            path = str(directory.resolve())
        self.rollout.load_weights(path, version)


class UploadTransport(WeightTransport):
    """``PUT /v1/weights?version=N`` with the safetensors file streamed as the body."""

    name = "upload"

    def send(self, directory: Path, version: int) -> None:
        """Stream ``directory/model.safetensors`` to the service."""
        self.rollout.upload_weights(directory / WEIGHTS_FILE, version)


def make_transport(
    method: Literal["auto", "load", "upload"],
    rollout: RolloutClient,
    *,
    staging_dir: Path,
    shared_dir: Path | None,
    service_dir: str | None,
) -> WeightTransport:
    """The transport ``sync.method`` names (``auto``: load when ``shared_dir`` is set)."""
    if method == "load" or (method == "auto" and shared_dir is not None):
        if shared_dir is None:
            raise ValueError("sync.method 'load' needs a shared directory (sync.shared_dir)")
        return LoadTransport(rollout, shared_dir, service_dir)
    return UploadTransport(rollout, staging_dir)


class WeightSync:
    """Pushes the trainer's weights to the rollout service and keeps them there.

    Versions only grow (docs/design.md §3), so this object owns the version counter:
    :meth:`push` serves version ``self.version + 1``. The last pushed directory stays on disk
    so that a rollout service which restarted (it comes back at version 0 with its initial
    weights) gets the current weights again (:meth:`restore`).
    """

    def __init__(
        self,
        rollout: RolloutClient,
        *,
        method: Literal["auto", "load", "upload"],
        staging_dir: Path,
        shared_dir: Path | None = None,
        service_dir: str | None = None,
    ) -> None:
        """``staging_dir``: private directory for uploads (e.g. RUN_DIR/weights)."""
        self.rollout = rollout
        self.transport = make_transport(
            method, rollout, staging_dir=staging_dir, shared_dir=shared_dir, service_dir=service_dir
        )
        self._fallback: WeightTransport | None = None
        if method == "auto" and isinstance(self.transport, LoadTransport):
            self._fallback = UploadTransport(rollout, staging_dir)
        self._roots = {self.transport.root, staging_dir}
        self.version = 0
        self._last_dir: Path | None = None
        self._lock = threading.RLock()

    @property
    def method(self) -> Literal["load", "upload"]:
        """The transport in use now (``auto`` resolves to one of these)."""
        return self.transport.name

    def start(self, write: Callable[[Path], None], min_version: int = 0) -> int:
        """Push the initial weights above both the serving version and ``min_version``.

        This is the start-up guarantee that the rollout service samples from exactly the
        trainer's weights (rather than comparing a probe's logprobs, which can only say
        "close").
        """
        with self._lock:
            served = self.rollout.weights_status().policy_version
            self.version = max(served, min_version)
            return self.push(write)

    def push(self, write: Callable[[Path], None]) -> int:
        """Write the weights with ``write(dir)`` (it must create ``dir/model.safetensors``)
        and make the service serve them as the next version; returns that version."""
        with self._lock:
            directory = self._write(write, self.version + 1)
            self.version = self._send(directory, self.version + 1)
            self._last_dir = directory
            self._prune()
            return self.version

    def restore(self, served_version: int, expected_min: int) -> bool:
        """Re-push the current weights if the service serves less than ``expected_min``
        (it restarted and lost them). Returns whether it did."""
        with self._lock:
            if served_version >= expected_min or self._last_dir is None:
                return False
            log.warning(
                "rollout service serves policy_version %d but %d was pushed: it restarted; "
                "pushing the current weights again",
                served_version,
                self.version,
            )
            self.version = self._send(self._last_dir, self.version)
            return True

    # ------------------------------------------------------------------ internals

    def _write(self, write: Callable[[Path], None], version: int) -> Path:
        root = self.transport.root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"v{version:09d}"
        tmp = root / f".tmp-v{version:09d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        if not (tmp / WEIGHTS_FILE).is_file():
            raise RuntimeError(f"weights writer did not create {tmp / WEIGHTS_FILE}")
        shutil.rmtree(final, ignore_errors=True)
        # The service must never see a half-written checkpoint: rename is atomic.
        os.replace(tmp, final)
        return final

    def _send(self, directory: Path, version: int) -> int:
        """Send ``directory`` as ``version`` or above; returns the version it is served as."""
        for _ in range(3):
            try:
                self.transport.send(directory, version)
                return version
            except ServiceError as exc:
                if exc.status == 409:
                    # Either our own earlier attempt landed (a retried request), or the
                    # service is ahead of us (another trainer, a resumed run): move above it.
                    served = self.rollout.weights_status().policy_version
                    if served == version:
                        return version
                    log.warning(
                        "rollout service is at version %d; pushing as %d", served, served + 1
                    )
                    version = served + 1
                elif self._fallback is not None and 400 <= (exc.status or 0) < 500:
                    log.warning(
                        "rollout service refused to load %s (%s); sync.method auto falls back "
                        "to upload for the rest of the run",
                        directory,
                        exc.detail,
                    )
                    # The upload reads the file where it is; later pushes write to staging.
                    self.transport, self._fallback = self._fallback, None
                else:
                    raise
        raise RuntimeError(f"could not push weights version {version} to the rollout service")

    def _prune(self) -> None:
        """Keep only the current weights directory (older versions are never re-pushed)."""
        for root in self._roots:
            if not root.is_dir():
                continue
            for old in root.glob("v*"):
                if old != self._last_dir and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
