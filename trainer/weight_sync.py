"""Pushing the trainer's weights to the rollout replicas, and keeping them there.

:class:`WeightSync` owns the version counter and the files; how one directory of weights
reaches a replica is a :class:`WeightTransport`, one class per ``sync.method``:

* :class:`LoadTransport` -- the weights are written into a directory both sides see and the
  replica is asked to load the path (``POST /v1/weights/load``);
* :class:`UploadTransport` -- the safetensors file is streamed as the body of
  ``PUT /v1/weights``.

``sync.method: auto`` starts with ``load`` when a shared directory is configured and falls
back to ``upload`` for good the first time a replica refuses the path.

``sync.method: broadcast`` sends each version's state dict over a torch.distributed group of
the trainer and every live replica (:class:`~trainer.broadcast_sync.BroadcastSender`). The
version is still written to disk (the trainer's staging directory, or ``shared_dir``): a
replica that restarts or is taken back gets it by the disk path (``load``/``upload``), and a
failed broadcast falls back to it for that version, with a warning. After two failed
broadcasts in a row the run stays on the disk path.

Weights never go through the pool's balancing (or a router): every version is sent to each
live replica of the rollout pool directly, so with ``sync.max_staleness: 0`` every replica
that samples the next batch serves the new version. A replica that fails a push is set aside;
before the pool takes a replica back (or one that was not ready at start) it is brought to
the current version (:meth:`WeightSync.bring_up_to_date`, registered as the pool's admission
check), and one that restarted unnoticed is caught by :meth:`WeightSync.restore` when its
answers carry an older ``policy_version``.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from trainer.clients import RolloutClient, ServiceError, ServiceUnavailable, map_concurrently
from trainer.pools import ReplicaPool

if TYPE_CHECKING:
    import torch

    from trainer.broadcast_sync import BroadcastSender

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

R = TypeVar("R")


class WeightTransport(abc.ABC):
    """How a directory holding ``model.safetensors`` becomes a replica's weights."""

    #: the ``sync.method`` this transport implements
    name: Literal["load", "upload"]

    def __init__(self, root: Path) -> None:
        """``root``: where :class:`WeightSync` writes the directories this transport sends."""
        self.root = root

    @abc.abstractmethod
    def send(self, rollout: RolloutClient, directory: Path, version: int) -> None:
        """Make the replica ``rollout`` serve the weights in ``directory`` as ``version``.

        Raises:
            ServiceError: the replica refused (409: the version is not newer than its own).
        """


class LoadTransport(WeightTransport):
    """``POST /v1/weights/load {path, version}``: the replica reads the path from its disk."""

    name = "load"

    def __init__(self, root: Path, service_dir: str | None = None):
        """``service_dir``: ``root`` as the replicas see it (containers); default: ``root``."""
        super().__init__(root)
        self.service_dir = service_dir

    def send(self, rollout: RolloutClient, directory: Path, version: int) -> None:
        """Ask the replica to load ``directory`` (mapped into its view of the disk)."""
        if self.service_dir:
            path = str(Path(self.service_dir) / directory.relative_to(self.root))
        else:
            path = str(directory.resolve())
        rollout.load_weights(path, version)


class UploadTransport(WeightTransport):
    """``PUT /v1/weights?version=N`` with the safetensors file streamed as the body."""

    name = "upload"

    def send(self, rollout: RolloutClient, directory: Path, version: int) -> None:
        """Stream ``directory/model.safetensors`` to the replica."""
        rollout.upload_weights(directory / WEIGHTS_FILE, version)


def make_transport(
    method: Literal["auto", "load", "upload", "broadcast"],
    *,
    staging_dir: Path,
    shared_dir: Path | None,
    service_dir: str | None,
) -> WeightTransport:
    """The transport ``sync.method`` names (``auto``, and ``broadcast``'s disk path: load when
    ``shared_dir`` is set, else upload)."""
    if method == "load" or (method in ("auto", "broadcast") and shared_dir is not None):
        if shared_dir is None:
            raise ValueError("sync.method 'load' needs a shared directory (sync.shared_dir)")
        return LoadTransport(shared_dir, service_dir)
    return UploadTransport(staging_dir)


class WeightSync:
    """Pushes the trainer's weights to every rollout replica and keeps them there.

    Versions only grow (docs/design.md §3), so this object owns the version counter:
    :meth:`push` serves version ``self.version + 1`` on every live replica. The last pushed
    directory stays on disk so that a replica which restarted (it comes back at version 0
    with its initial weights) gets the current weights again.
    """

    def __init__(
        self,
        rollout: RolloutClient | ReplicaPool[RolloutClient],
        *,
        method: Literal["auto", "load", "upload", "broadcast"],
        staging_dir: Path,
        shared_dir: Path | None = None,
        service_dir: str | None = None,
        broadcaster: Callable[[list[RolloutClient]], BroadcastSender] | None = None,
    ) -> None:
        """``rollout``: the rollout pool (or one replica's client). ``staging_dir``: private
        directory for uploads (e.g. RUN_DIR/weights). ``broadcaster``: with ``method:
        broadcast``, builds the sender for a set of replicas (a new one when the live set
        changes)."""
        self.pool = (
            rollout if isinstance(rollout, ReplicaPool) else ReplicaPool("rollout", [rollout])
        )
        self.transport = make_transport(
            method, staging_dir=staging_dir, shared_dir=shared_dir, service_dir=service_dir
        )
        self._fallback: WeightTransport | None = None
        if method in ("auto", "broadcast") and isinstance(self.transport, LoadTransport):
            self._fallback = UploadTransport(staging_dir)
        if method == "broadcast" and broadcaster is None:
            raise ValueError("sync.method 'broadcast' needs a broadcaster")
        self._broadcaster = broadcaster if method == "broadcast" else None
        self._sender: BroadcastSender | None = None
        self._sender_for: tuple[str, ...] = ()
        self._broadcast_failures = 0
        self._roots = {self.transport.root, staging_dir}
        self.version = 0
        self._last_dir: Path | None = None
        self._lock = threading.RLock()
        self._switch = threading.Lock()
        # No replica is taken back while a push is choosing or serving its targets, and none
        # is taken back before it serves the current version.
        self.pool.admission_gate = self._lock
        self.pool.admission_checks.append(self.bring_up_to_date)

    @property
    def method(self) -> Literal["load", "upload", "broadcast"]:
        """The transport in use now (``auto`` resolves to load or upload; ``broadcast`` stays
        until it falls back for good)."""
        return "broadcast" if self._broadcaster is not None else self.transport.name

    def start(self, write: Callable[[Path], None], min_version: int = 0) -> int:
        """Push the initial weights above every replica's serving version and ``min_version``.

        This is the start-up guarantee that the rollout replicas sample from exactly the
        trainer's weights (rather than comparing a probe's logprobs, which can only say
        "close").
        """
        with self._lock:
            served = self._each(lambda c: c.weights_status().policy_version, self.pool.live())
            self.version = max([min_version, *(v for v in served if isinstance(v, int))])
            return self.push(write)

    def push(
        self, write: Callable[[Path], None], state: dict[str, torch.Tensor] | None = None
    ) -> int:
        """Write the weights with ``write(dir)`` (it must create ``dir/model.safetensors``)
        and make every live replica serve them as the next version; returns that version.
        With ``sync.method: broadcast`` the ``state`` dict (the same weights) goes over the
        group, the written directory being the fallback and what restarted replicas get."""
        with self._lock:
            directory = self._write(write, self.version + 1)
            version = self.version + 1
            if not (state is not None and self._broadcast(state, version)):
                version = self._send_all(directory, version)
            self.version = version
            self._last_dir = directory
            self._prune()
            return self.version

    def close(self) -> None:
        """Tear down the broadcast group, if one was set up."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _broadcast(self, state: dict[str, torch.Tensor], version: int) -> bool:
        """Send ``state`` as ``version`` over the group; False when it failed (the caller
        then takes the disk path, where replicas that did swap answer 409)."""
        from trainer.broadcast_sync import BroadcastError

        if self._broadcaster is None:
            return False
        live = self.pool.live()
        key = tuple(c.base_url for c in live)
        if self._sender is None or key != self._sender_for:
            self.close()
            self._sender, self._sender_for = self._broadcaster(list(live)), key
        try:
            self._sender.send(state, version)
        except BroadcastError as exc:
            self._broadcast_failures += 1
            stay = self._broadcast_failures >= 2
            log.warning(
                "weight broadcast of version %d failed (%s); sending it by %s%s",
                version,
                exc,
                self.transport.name,
                ", and staying on that path for the rest of the run" if stay else "",
            )
            if stay:
                self.close()
                self._broadcaster = None
            return False
        self._broadcast_failures = 0
        return True

    def restore(
        self, served_version: int, expected_min: int, replica: RolloutClient | None = None
    ) -> bool:
        """Re-push the current weights if a replica serves less than ``expected_min`` (it
        restarted and lost them): to ``replica``, or to every live one. Returns whether it
        did."""
        # Every rollout answer comes through here: the usual case must not wait on the lock
        # a push holds while it writes and sends a whole version (a producer thread would
        # stall for the push, not just the service's swap).
        if served_version >= expected_min:
            return False
        with self._lock:
            if served_version >= expected_min or self._last_dir is None:
                return False
            where = replica.base_url if replica is not None else "the rollout service"
            log.warning(
                "%s serves policy_version %d but %d was pushed: it restarted; pushing the "
                "current weights again",
                where,
                served_version,
                self.version,
            )
            for client in [replica] if replica is not None else self.pool.live():
                self._send_one(client, self._last_dir, self.version)
            return True

    def bring_up_to_date(self, replica: RolloutClient) -> None:
        """Make ``replica`` serve the current version (the pool's admission check).

        Raises:
            RuntimeError: it serves a newer version than the trainer's (another trainer?).
            ServiceError: it could not take the weights.
        """
        with self._lock:
            if self._last_dir is None:
                return  # nothing pushed yet: start() sends to every live replica
            served = replica.weights_status().policy_version
            if served == self.version:
                return
            if served > self.version:
                raise RuntimeError(
                    f"{replica.base_url} serves policy_version {served}, above the trainer's "
                    f"{self.version}: is another trainer pushing to it?"
                )
            log.warning(
                "rollout replica %s serves policy_version %d; bringing it to %d",
                replica.base_url,
                served,
                self.version,
            )
            if self._send_one(replica, self._last_dir, self.version) != self.version:
                raise RuntimeError(f"{replica.base_url} did not take version {self.version}")

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
        # A replica must never see a half-written checkpoint: rename is atomic.
        os.replace(tmp, final)
        return final

    def _each(
        self, fn: Callable[[RolloutClient], R], clients: Sequence[RolloutClient]
    ) -> list[R | ServiceUnavailable]:
        """``fn`` on each replica at once. With several replicas, one that is down is set
        aside (its entry is the error); with one, the error is raised."""
        several = len(self.pool.clients) > 1

        def one(client: RolloutClient) -> R | ServiceUnavailable:
            try:
                return fn(client)
            except ServiceUnavailable as exc:
                if not several:
                    raise
                self.pool.eject(client, exc)
                return exc

        return map_concurrently(one, list(clients), max(1, len(clients)))

    def _send_all(self, directory: Path, version: int) -> int:
        """Send ``directory`` to every live replica as ``version`` or above (all the same);
        returns the version they serve it as."""
        for _ in range(3):
            outcomes = self._each(
                lambda c, v=version: self._send_one(c, directory, v), self.pool.live()
            )
            served = [v for v in outcomes if isinstance(v, int)]
            if not served:
                break
            if max(served) == version:
                return version
            # A replica is ahead of us (another trainer, a resumed run): everyone moves above it.
            log.warning(
                "a rollout replica is at version %d; pushing as %d", max(served), max(served) + 1
            )
            version = max(served) + 1
        else:
            raise RuntimeError(f"could not push weights version {version} to the rollout pool")
        # Every replica is set aside: wait (up to the retry budget) for one to come back;
        # taking it back brings it to this version.
        self.version, self._last_dir = version, directory
        self.pool.wait_live()
        return version

    def _send_one(self, replica: RolloutClient, directory: Path, version: int) -> int:
        """Send ``directory`` to one replica as ``version``; returns the version it serves
        afterwards (``version``, or a newer one it already had: 409)."""
        for _ in range(3):
            transport = self.transport
            try:
                transport.send(replica, directory, version)
                return version
            except ServiceUnavailable:
                raise
            except ServiceError as exc:
                if exc.status == 409:
                    # Either our own earlier attempt landed (a retried request), or the
                    # replica is ahead of us: the caller moves above it.
                    served = replica.weights_status().policy_version
                    if served >= version:
                        return served
                    continue
                if not (isinstance(transport, LoadTransport) and 400 <= (exc.status or 0) < 500):
                    raise
                with self._switch:
                    if self._fallback is not None and self.transport is transport:
                        log.warning(
                            "rollout replica %s refused to load %s (%s); sync.method auto falls "
                            "back to upload for the rest of the run",
                            replica.base_url,
                            directory,
                            exc.detail,
                        )
                        # The upload reads the file where it is; later pushes write to staging.
                        self.transport, self._fallback = self._fallback, None
                if self.transport is transport:
                    raise  # sync.method load: the refusal is the answer
        raise RuntimeError(f"could not push weights version {version} to {replica.base_url}")

    def _prune(self) -> None:
        """Keep only the current weights directory (older versions are never re-pushed)."""
        for root in self._roots:
            if not root.is_dir():
                continue
            for old in root.glob("v*"):
                if old != self._last_dir and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
