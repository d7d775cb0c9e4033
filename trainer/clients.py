"""HTTP clients of the teacher and rollout services, with retries, and the weight sync.

Everything the trainer sends or receives is a model of :mod:`services.protocol`, so the wire
contract has one definition. Failures are sorted into two kinds:

* transient -- connection errors, timeouts, 408/425/429 and every 5xx: retried with
  exponential backoff and jitter, honouring ``Retry-After``, until ``max_attempts`` or the
  ``deadline_s`` of the :class:`RetryPolicy` runs out (long enough to outlive a restart);
* fatal -- any other 4xx: raised at once as :class:`ServiceError` with the server's message
  (the OpenAI error body names the field and position), because sending it again cannot help.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import numpy as np

from services.protocol import (
    InfoResponse,
    RolloutItem,
    RolloutRequest,
    RolloutResponse,
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    WeightsLoadRequest,
    WeightsStatus,
    decode_array,
)

__all__ = [
    "RetryPolicy",
    "RolloutClient",
    "ServiceClient",
    "ServiceError",
    "ServiceUnavailable",
    "TeacherClient",
    "WeightSync",
    "map_concurrently",
    "parse_retry_after",
]

log = logging.getLogger("opd.trainer.clients")

T = TypeVar("T")
R = TypeVar("R")

#: Statuses worth sending again: timeouts, rate limits and every server-side failure.
RETRYABLE_4XX = frozenset({408, 425, 429})
WEIGHTS_FILE = "model.safetensors"


class ServiceError(RuntimeError):
    """A request failed for good: a 4xx the retry cannot fix, or retries ran out."""

    def __init__(self, service: str, method: str, url: str, status: int | None, message: str):
        where = f"{service} {method} {url}"
        super().__init__(f"{where} -> {status}: {message}" if status else f"{where}: {message}")
        self.service = service
        self.status = status
        self.detail = message


class ServiceUnavailable(ServiceError):
    """Transient failures went on past the retry budget (service down, overloaded, ...)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``min(max_s, initial_s * 2**(attempt-1))``, then a
    random factor in ``[0.5, 1]``; a server's ``Retry-After`` is a lower bound. Stops after
    ``max_attempts`` attempts or once ``deadline_s`` seconds have passed."""

    max_attempts: int = 30
    deadline_s: float = 600.0
    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_s, self.initial_s * 2.0 ** (attempt - 1))
        # Jitter spreads the retries of many clients after one outage (no thundering herd).
        delay = base * (0.5 + 0.5 * rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_s))
        return delay


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(resp: httpx.Response) -> str:
    """The OpenAI-style ``error.message`` of a response, else its (shortened) text."""
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            extra = f" (param: {err['param']})" if err.get("param") else ""
            return f"{err.get('message', '')}{extra}"
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    return resp.text[:500]


def map_concurrently(fn: Callable[[T], R], items: Sequence[T], max_workers: int) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` threads, in order; the first
    exception is raised (after the other calls finish)."""
    if len(items) <= 1 or max_workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]


class ServiceClient:
    """One service: JSON requests with retries, ``/ready`` polling and ``/info``."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 8,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``transport`` and ``sleep`` exist for tests (``httpx.MockTransport``, a fake clock)."""
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.info_raw: dict[str, Any] = {}
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        # A private generator: jitter must not consume the global RNG the run seeds (resume
        # determinism), and must differ between processes.
        self._rng = random.Random(os.urandom(8))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(30.0, timeout_s)),
            limits=httpx.Limits(max_connections=max_connections * 2),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ------------------------------------------------------------------ core

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Callable[[], bytes | Iterator[bytes]] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send one request, retrying transient failures; return the 2xx/3xx response.

        ``content`` is a factory so a streamed body can be produced afresh for each attempt.

        Raises:
            ServiceError: a non-retryable status (the server's error message included).
            ServiceUnavailable: transient failures outlasted the retry policy.
        """
        url = f"{self.base_url}{path}"
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                resp = self._http.request(
                    method,
                    path,
                    json=json,
                    content=content() if content is not None else None,
                    params=params,
                    headers=headers,
                )
            except httpx.TransportError as exc:  # connect/read/write errors, timeouts
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return resp
                message = _error_message(resp)
                if resp.status_code < 500 and resp.status_code not in RETRYABLE_4XX:
                    raise ServiceError(self.name, method, url, resp.status_code, message)
                failure = f"HTTP {resp.status_code}: {message}"
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            elapsed = time.monotonic() - start
            delay = self.retry.delay(attempt, retry_after, self._rng)
            if (
                not retry
                or attempt >= self.retry.max_attempts
                or (elapsed + delay > self.retry.deadline_s)
            ):
                raise ServiceUnavailable(
                    self.name,
                    method,
                    url,
                    None,
                    f"gave up after {attempt} attempt(s) over {elapsed:.1f}s; last: {failure}",
                )
            log.warning(
                "%s %s %s failed (%s); retry %d in %.1fs",
                self.name,
                method,
                path,
                failure,
                attempt,
                delay,
            )
            self._sleep(delay)

    def get_json(self, path: str, **kw: Any) -> Any:
        """GET and decode JSON."""
        return self.request("GET", path, **kw).json()

    def post_json(self, path: str, body: Any, **kw: Any) -> Any:
        """POST a JSON body and decode the JSON answer."""
        return self.request("POST", path, json=body, **kw).json()

    # ------------------------------------------------------------------ lifecycle

    def info(self) -> InfoResponse:
        """``GET /info`` (the raw JSON stays in ``self.info_raw`` for fields the model
        does not declare, e.g. ``tokenizer_fingerprint_components``)."""
        self.info_raw = self.get_json("/info")
        return InfoResponse.model_validate(self.info_raw)

    def wait_ready(self, timeout_s: float, poll_s: float = 1.0) -> InfoResponse:
        """Poll ``/ready`` until it answers 200 (model loaded), then return ``/info``.

        Raises:
            ServiceUnavailable: not ready within ``timeout_s``; says what was seen last.
        """
        deadline = time.monotonic() + timeout_s
        delay = poll_s
        last = "no answer yet"
        while True:
            try:
                resp = self._http.get("/ready")
                if resp.status_code == 200:
                    return self.info()
                last = f"/ready answered {resp.status_code}: {_error_message(resp)}"
                if resp.status_code in (401, 403):
                    raise ServiceError(
                        self.name,
                        "GET",
                        f"{self.base_url}/ready",
                        resp.status_code,
                        "refused: check the API key (services.api_key_env)",
                    )
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                raise ServiceUnavailable(
                    self.name,
                    "GET",
                    f"{self.base_url}/ready",
                    None,
                    f"not ready after {timeout_s:.0f}s (last: {last}). Is the {self.name} "
                    f"service running at {self.base_url}? Start it with `opd {self.name} "
                    "--model ...` or fix services.*_url",
                )
            self._sleep(delay)
            delay = min(delay * 1.5, 10.0)


class TeacherClient(ServiceClient):
    """The teacher: ``POST /v1/score`` of token-id sequences."""

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        temperature: float,
        sequences_per_request: int = 64,
        max_concurrency: int = 8,
    ) -> list[np.ndarray]:
        """Teacher logprob of every response token given the prompt and earlier tokens.

        Sequence ``i`` is sent as ``token_ids = prompts[i] + responses[i]`` with
        ``start = len(prompts[i])``; the answer is float32 ``[len(responses[i])]``. Empty
        responses are not sent (their answer is an empty array).
        """
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        out: list[np.ndarray] = [np.zeros(0, np.float32) for _ in responses]
        todo = [i for i, r in enumerate(responses) if len(r) > 0]
        chunks = [
            todo[k : k + sequences_per_request] for k in range(0, len(todo), sequences_per_request)
        ]

        def one(chunk: list[int]) -> list[np.ndarray]:
            body = ScoreRequest(
                sequences=[
                    ScoreSequence(
                        token_ids=[int(t) for t in prompts[i]] + [int(t) for t in responses[i]],
                        start=len(prompts[i]),
                    )
                    for i in chunk
                ],
                temperature=temperature,
                encoding="base64",
            )
            answer = ScoreResponse.model_validate(
                self.post_json("/v1/score", body.model_dump(mode="json", exclude_none=True))
            )
            got: list[np.ndarray | None] = [None] * len(chunk)
            for item in answer.data:
                got[item.index] = decode_array(item.logprobs).astype(np.float32, copy=False)
            for j, i in enumerate(chunk):
                if got[j] is None or len(got[j]) != len(responses[i]):  # type: ignore[arg-type]
                    raise ServiceError(
                        self.name,
                        "POST",
                        f"{self.base_url}/v1/score",
                        200,
                        f"sequence {j}: expected {len(responses[i])} logprobs, got "
                        f"{None if got[j] is None else len(got[j])}",  # type: ignore[arg-type]
                    )
            return got  # type: ignore[return-value]

        for chunk, result in zip(
            chunks, map_concurrently(one, chunks, max_concurrency), strict=True
        ):
            for i, lp in zip(chunk, result, strict=True):
                out[i] = lp
        return out


class RolloutClient(ServiceClient):
    """The student rollout service: sampling and weight updates."""

    def rollouts(
        self,
        prompts: Sequence[dict[str, Any]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> RolloutResponse:
        """One ``POST /v1/rollouts``; ``prompts`` are ``RolloutPrompt`` dicts (e.g.
        ``{"messages": [...]}``). Arrays come back base64-encoded."""
        body = RolloutRequest(
            prompts=list(prompts),  # type: ignore[arg-type]
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            encoding="base64",
        )
        answer = RolloutResponse.model_validate(
            self.post_json("/v1/rollouts", body.model_dump(mode="json", exclude_none=True))
        )
        if len(answer.data) != len(prompts) * n:
            raise ServiceError(
                self.name,
                "POST",
                f"{self.base_url}/v1/rollouts",
                200,
                f"expected {len(prompts) * n} trajectories, got {len(answer.data)}",
            )
        return answer

    def weights_status(self) -> WeightsStatus:
        """``GET /v1/weights``."""
        return WeightsStatus.model_validate(self.get_json("/v1/weights"))

    def load_weights(self, path: str, version: int) -> WeightsStatus:
        """``POST /v1/weights/load``: the service reads a checkpoint dir from its disk."""
        body = WeightsLoadRequest(path=path, version=version).model_dump()
        return WeightsStatus.model_validate(self.post_json("/v1/weights/load", body))

    def upload_weights(self, file: Path, version: int) -> WeightsStatus:
        """``PUT /v1/weights?version=N`` with a safetensors file streamed as the body."""

        def body() -> Iterator[bytes]:
            with open(file, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    yield chunk

        resp = self.request(
            "PUT",
            "/v1/weights",
            params={"version": version},
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(file.stat().st_size),
            },
        )
        return WeightsStatus.model_validate(resp.json())


def rollout_item_arrays(item: RolloutItem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(prompt_token_ids, token_ids, logprobs)`` of a trajectory as numpy arrays."""
    return (
        decode_array(item.prompt_token_ids).astype(np.int64, copy=False).reshape(-1),
        decode_array(item.token_ids).astype(np.int64, copy=False).reshape(-1),
        decode_array(item.logprobs).astype(np.float32, copy=False).reshape(-1),
    )


# --------------------------------------------------------------------------------- weights


class WeightSync:
    """Pushes the trainer's weights to the rollout service and keeps them there.

    Versions only grow (DESIGN.md section 3), so this object owns the version counter:
    :meth:`push` serves version ``self.version + 1``. The last pushed file stays on disk so
    that a rollout service which restarted (it comes back at version 0 with its initial
    weights) gets the current weights again (:meth:`restore`).

    ``method``: ``load`` writes into ``shared_dir`` and asks the service to load the path
    (as ``service_dir`` names it); ``upload`` streams the file; ``auto`` tries ``load`` when a
    ``shared_dir`` is given and falls back to ``upload`` for good if the service refuses it.
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
        self.method: Literal["load", "upload"]
        if method == "auto":
            self.method = "load" if shared_dir is not None else "upload"
        else:
            self.method = method
        self._fallback_ok = method == "auto"
        self.staging_dir = staging_dir
        self.shared_dir = shared_dir
        self.service_dir = service_dir
        self.version = 0
        self._last_dir: Path | None = None
        self._lock = threading.RLock()

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
            version = self.version + 1
            directory = self._write(write, version)
            version = self._send(directory, version)
            self.version = version
            self._last_dir = directory
            self._prune()
            return version

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
        root = self.shared_dir if self.method == "load" else self.staging_dir
        assert root is not None
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

    def _service_path(self, directory: Path) -> str:
        if self.service_dir and self.shared_dir is not None:
            return str(Path(self.service_dir) / directory.relative_to(self.shared_dir))
        return str(directory.resolve())

    def _send(self, directory: Path, version: int) -> int:
        for _ in range(3):
            try:
                if self.method == "load":
                    self.rollout.load_weights(self._service_path(directory), version)
                else:
                    self.rollout.upload_weights(directory / WEIGHTS_FILE, version)
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
                    continue
                if (
                    self.method == "load"
                    and self._fallback_ok
                    and exc.status is not None
                    and 400 <= exc.status < 500
                ):
                    log.warning(
                        "rollout service refused to load %s (%s); sync.method auto falls back "
                        "to upload for the rest of the run",
                        directory,
                        exc.detail,
                    )
                    self.method = "upload"
                    continue
                raise
        raise RuntimeError(f"could not push weights version {version} to the rollout service")

    def _prune(self) -> None:
        """Keep only the current weights directory (older versions are never re-pushed)."""
        for root in {self.shared_dir, self.staging_dir} - {None}:
            assert root is not None
            if not root.is_dir():
                continue
            for old in root.glob("v*"):
                if old != self._last_dir and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
