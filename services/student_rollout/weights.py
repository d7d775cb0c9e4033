"""Weight updates of the rollout service: load by path, upload, status (docs/design.md §3).

- `POST /v1/weights/load {"path", "version"}`: a safetensors checkpoint directory that must
  resolve *inside* the configured `weights_dir` (`..` refused outright; symlinks resolved, so
  a link pointing outside is refused too, for the directory and for each file in it).
- `PUT /v1/weights?version=N` with a raw safetensors body: streamed to a file in a private
  staging directory (bounded by `max_upload_bytes`: `Content-Length` is checked before a byte
  is read, the running total while streaming), then handled like a load.
- `GET /v1/weights`: the version serving, its source and when it started serving.

Every update is checked against the *initial* checkpoint's tensor names, shapes and dtypes
(`services.engine.checkpoint`) before the model is touched, then swapped under the write lock
of `PolicyVersions`. Anything wrong is a 4xx and the old weights keep serving under the old
version: 400 for a bad checkpoint or request, 403 for a path outside `weights_dir` (or no
`weights_dir` configured), 409 for a version that is not newer, 413 for a body over the limit.

The manager keeps the serving weights on disk in a directory of its own (the staged upload
itself, or hard links to a loaded checkpoint's files, copies across filesystems) until a newer
update succeeds: an engine that fails part-way through an update restores from the directory
it last loaded (the vllm backend reloads it), so that directory must outlive whatever the
trainer deletes afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.requests import ClientDisconnect

from services.common.app import ServiceState, get_state
from services.common.errors import APIError
from services.common.openapi import error_responses
from services.engine.base import Engine, WeightsError
from services.engine.checkpoint import (
    INDEX_FILE,
    CheckpointSpec,
    reference_checkpoint,
    validate_checkpoint_dir,
)
from services.protocol import WeightsLoadRequest, WeightsStatus
from services.student_rollout.settings import RolloutSettings
from services.student_rollout.versioning import PolicyVersions, VersionConflict, unwrap_engine

logger = logging.getLogger("opd.student_rollout")

UPLOAD_FILE = "model.safetensors"
# Disk writes are batched and done off the event loop; uvicorn hands us ~64 KiB chunks.
_WRITE_BLOCK = 8 * 1024 * 1024


def _retrieve(task: asyncio.Task[None]) -> None:
    """Done-callback of a swap task: log a failure nobody awaited (its request was cancelled)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, WeightsError | VersionConflict):
        logger.error("weight update failed", exc_info=exc)


class WeightsManager:
    """Validation, staging and swapping of weight updates for one app."""

    def __init__(self, settings: RolloutSettings, versions: PolicyVersions) -> None:
        self.settings = settings
        self.versions = versions
        self.spec: CheckpointSpec | None = None
        self.spec_error: str | None = None
        self.staging_root: Path | None = None
        # The manager's copy of the weights serving now (None: the initial checkpoint).
        self.serving_dir: Path | None = None
        # Called with the new version after each successful swap (the app sets the gauge).
        self.on_version: Callable[[int], None] | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Read the reference spec from the initial checkpoint; make the private staging dir."""
        reference = reference_checkpoint(self.settings.model)
        self.spec, self.spec_error = reference.spec, reference.error
        if self.spec_error:
            logger.warning("weight updates disabled: %s", self.spec_error)
        if self.settings.staging_dir is not None:
            self.settings.staging_dir.mkdir(parents=True, exist_ok=True)
        # mkdtemp: mode 0700 and an unpredictable name, so no other local user can plant or
        # swap a file between our validation and our load.
        self.staging_root = Path(
            tempfile.mkdtemp(prefix="opd-rollout-staging-", dir=self.settings.staging_dir)
        )

    def close(self) -> None:
        """Remove the staging directory (and any upload left in it)."""
        if self.staging_root is not None:
            shutil.rmtree(self.staging_root, ignore_errors=True)
            self.staging_root = None
            self.serving_dir = None

    # ----------------------------------------------------------------- status

    def status(self) -> WeightsStatus:
        """The version serving now, its source and load time."""
        snap = self.versions.current
        return WeightsStatus(
            policy_version=snap.version,
            loaded_at=snap.loaded_at,
            source=snap.source,
            update_seconds=snap.update_seconds,
        )

    # ----------------------------------------------------------------- checks

    def _require_spec(self) -> CheckpointSpec:
        if self.spec is None:
            raise APIError(
                503,
                f"weight updates are unavailable: {self.spec_error or 'model not loaded yet'}",
                code="weights_unavailable",
            )
        return self.spec

    def _conflict(self, exc: VersionConflict) -> APIError:
        return APIError(409, str(exc), param="version", code="version_conflict")

    def check_version(self, version: int) -> None:
        """409 unless `version` is newer than the one serving."""
        try:
            self.versions.check_newer(version)
        except VersionConflict as exc:
            raise self._conflict(exc) from exc

    def resolve_load_path(self, raw: str) -> Path:
        """The checkpoint directory named by a load request, inside `weights_dir` or a 4xx.

        Relative paths are taken relative to `weights_dir`. Any `..` component is refused
        before resolving (it can only be an attempt to leave the directory); after resolving
        (which follows symlinks) the result must still lie inside `weights_dir`.
        """
        root = self.settings.weights_dir
        if root is None:
            raise APIError(
                403,
                "path: loading by path is disabled: the service was started without "
                "--weights-dir (use PUT /v1/weights to upload instead)",
                param="path",
                code="weights_dir_not_configured",
            )
        candidate = Path(raw).expanduser()
        if ".." in candidate.parts:
            raise APIError(
                400,
                f"path: {raw!r} contains '..'; give a path inside the weights directory",
                param="path",
                code="invalid_path",
            )
        try:
            resolved = (root / candidate).resolve()  # an absolute `candidate` replaces `root`
        except (OSError, ValueError) as exc:  # NUL bytes, names too long, symlink loops
            raise APIError(
                400,
                f"path: {raw!r} is not a usable path: {exc}",
                param="path",
                code="invalid_path",
            ) from exc
        if not resolved.is_relative_to(root):
            raise APIError(
                403,
                f"path: {raw!r} resolves to {str(resolved)!r}, outside the weights directory "
                f"{str(root)!r}",
                param="path",
                code="path_outside_weights_dir",
            )
        return resolved

    def _check_files_inside(self, files: list[Path], raw: str) -> None:
        root = self.settings.weights_dir
        assert root is not None
        for file in files:
            target = file.resolve()
            if not target.is_relative_to(root):
                raise APIError(
                    403,
                    f"path: {raw!r}: file {file.name!r} is a link to {str(target)!r}, outside "
                    f"the weights directory {str(root)!r}",
                    param="path",
                    code="path_outside_weights_dir",
                )

    async def _validate(self, directory: Path, param: str) -> list[Path]:
        spec = self._require_spec()
        try:
            return await asyncio.to_thread(validate_checkpoint_dir, directory, spec)
        except WeightsError as exc:
            raise APIError(
                400,
                f"{param}: checkpoint refused: {exc}; still serving policy_version "
                f"{self.versions.version}",
                param=param,
                code="invalid_checkpoint",
            ) from exc

    # ----------------------------------------------------------------- swap

    def _pin(self, directory: Path, files: list[Path]) -> Path:
        """A directory of the manager's own holding a checkpoint's `files` (and its index).

        Hard links where the staging area shares a filesystem with `directory` (instant, no
        extra disk), copies otherwise; either way the weights stay on disk whatever happens to
        `directory` later.
        """
        assert self.staging_root is not None
        pinned = Path(tempfile.mkdtemp(prefix="serving-", dir=self.staging_root))
        index = directory / INDEX_FILE
        try:
            for file in [*files, *([index] if index.is_file() else [])]:
                try:
                    os.link(file, pinned / file.name)
                except OSError:  # another filesystem, or links not supported
                    shutil.copy2(file, pinned / file.name)
        except BaseException:
            shutil.rmtree(pinned, ignore_errors=True)
            raise
        return pinned

    async def _swap(
        self,
        engine: Engine,
        directory: Path,
        version: int,
        source: str,
        started: float,
        files: list[Path] | None,
    ) -> None:
        # `_pin` removes what it made if it fails; from here `swap_in` owns the directory.
        owned = directory if files is None else await asyncio.to_thread(
            self._pin, directory, files)
        await self.swap_in(lambda: engine.load_weights(str(owned)), version, source, started,
                           owned)

    async def swap_in(
        self,
        load: Callable[[], Awaitable[None]],
        version: int,
        source: str,
        started: float,
        owned: Path | None,
    ) -> None:
        """The swap step of every transport: `await load()` under the write lock, then commit
        `version` and make `owned` (None: the weights are kept in memory by the engine) the
        directory of the serving weights, dropping the previous one. On failure `owned` is
        removed and the old weights serve on, from `self.serving_dir`, which stays."""
        previous: Path | None = None
        try:
            async with self.versions.updating(version, source, started):
                await load()
                # Inside the exclusive hold, so two updates can never both claim the slot.
                previous, self.serving_dir = self.serving_dir, owned
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        # Here, not in `apply`: the swap may outlive a cancelled request.
        if self.on_version is not None:
            self.on_version(self.versions.version)
        logger.info("policy_version %d now serving (%s)", version, source)
        if previous is not None:
            await asyncio.to_thread(shutil.rmtree, previous, True)

    async def apply(
        self,
        state: ServiceState,
        engine: Engine,
        directory: Path,
        version: int,
        source: str,
        started: float,
        files: list[Path] | None = None,
    ) -> WeightsStatus:
        """Swap in a validated checkpoint under the write lock; commit `version` on success.

        With `files` (a load by path: the validated files of `directory`), the checkpoint is
        first pinned into a directory of the manager's own; without, `directory` is a staged
        upload the manager owns already. The manager keeps that directory while its weights
        serve and removes it when a newer update succeeds, or at once if this one fails.
        """
        # A task of its own, shielded: if this request is cancelled (timeout, disconnect) the
        # swap still runs to its end under the lock instead of stopping half-way with readers
        # let back in. The client can read GET /v1/weights to see whether it landed.
        task = asyncio.create_task(self._swap(engine, directory, version, source, started, files))
        task.add_done_callback(_retrieve)
        try:
            await asyncio.shield(task)
        except VersionConflict as exc:
            raise self._conflict(exc) from exc
        except WeightsError as exc:
            raise APIError(
                400,
                f"checkpoint refused by the engine: {exc}; still serving policy_version "
                f"{self.versions.version}",
                param="body" if source == "upload" else "path",
                code="invalid_checkpoint",
            ) from exc
        return self.status()

    # ----------------------------------------------------------------- upload

    async def stage_upload(self, state: ServiceState, request: Request) -> Path:
        """Stream the request body to a fresh directory in the staging area; returns it."""
        limit = self.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise APIError(
                    400, "Content-Length: not an integer", param="Content-Length"
                ) from None
            if size > limit:
                state.metrics.rejected("body_size")
                raise APIError(
                    413,
                    f"body: {size} bytes is over this server's limit of {limit} bytes "
                    "(max_upload_bytes)",
                    code="request_too_large",
                    headers={"Connection": "close"},
                )
        assert self.staging_root is not None
        upload_dir = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging_root))
        try:
            received = 0
            with (upload_dir / UPLOAD_FILE).open("wb") as f:
                block = bytearray()
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        state.metrics.rejected("body_size")
                        raise APIError(
                            413,
                            f"body: more than {limit} bytes (max_upload_bytes)",
                            code="request_too_large",
                            headers={"Connection": "close"},
                        )
                    block += chunk
                    if len(block) >= _WRITE_BLOCK:
                        data, block = block, bytearray()
                        await asyncio.to_thread(f.write, data)
                if block:
                    await asyncio.to_thread(f.write, block)
            if received == 0:
                raise APIError(
                    400,
                    "body: empty; send the safetensors file as the request body",
                    param="body",
                    code="empty",
                )
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        return upload_dir


# --------------------------------------------------------------------------- routes


def _manager(request: Request) -> WeightsManager:
    return request.app.state.weights


def _record(state: ServiceState, method: str, exc: BaseException | None, started: float) -> None:
    if exc is None:
        state.metrics.weight_update(method, "ok", time.perf_counter() - started)
    elif isinstance(exc, APIError) and exc.status < 500:
        state.metrics.weight_update(method, "rejected")
    else:
        state.metrics.weight_update(method, "error")


# The upload body is read as a stream, not by FastAPI, so the schema is declared by hand.
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one safetensors file (the student's full state dict)",
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
    }
}


def weights_router() -> APIRouter:
    """`GET /v1/weights`, `POST /v1/weights/load`, `PUT /v1/weights`."""
    router = APIRouter(tags=["weights"])

    @router.get("/v1/weights", response_model=WeightsStatus, responses=error_responses(503))
    async def weights_status(request: Request) -> WeightsStatus:
        """The policy version serving now and when it was loaded."""
        get_state(request).require_engine()
        return _manager(request).status()

    @router.post("/v1/weights/load", response_model=WeightsStatus,
                 responses=error_responses(400, 403, 409, 503))
    async def load_weights(body: WeightsLoadRequest, request: Request) -> WeightsStatus:
        """Load a safetensors checkpoint directory inside `weights_dir` as `version`."""
        state = get_state(request)
        manager = _manager(request)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            engine = unwrap_engine(state.require_engine())
            directory = manager.resolve_load_path(body.path)
            manager.check_version(body.version)
            files = await manager._validate(directory, "path")
            manager._check_files_inside(files, body.path)
            return await manager.apply(
                state, engine, directory, body.version, str(directory), started, files=files
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            _record(state, "load", error, started)

    @router.put("/v1/weights", response_model=WeightsStatus,
                responses=error_responses(400, 409, 413, 503), openapi_extra=_UPLOAD_BODY)
    async def upload_weights(
        request: Request,
        version: int = Query(..., ge=0, description="the policy version of the uploaded weights"),
    ) -> WeightsStatus:
        """Upload one safetensors file as the request body and serve it as `version`."""
        state = get_state(request)
        manager = _manager(request)
        started = time.perf_counter()
        error: BaseException | None = None
        upload_dir: Path | None = None
        try:
            engine = unwrap_engine(state.require_engine())
            manager._require_spec()
            # Before reading the body: an old version is refused without the upload.
            manager.check_version(version)
            upload_dir = await manager.stage_upload(state, request)
            await manager._validate(upload_dir, "body")
            # From here the swap task owns the staged files (it may outlive this request).
            staged, upload_dir = upload_dir, None
            return await manager.apply(state, engine, staged, version, "upload", started)
        except ClientDisconnect:
            error = APIError(400, "body: the client disconnected during the upload")
            raise error from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            if upload_dir is not None:
                shutil.rmtree(upload_dir, ignore_errors=True)
            _record(state, "upload", error, started)

    return router
