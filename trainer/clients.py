"""HTTP clients of the teacher and rollout services.

Everything the trainer sends or receives is a model of :mod:`services.protocol`, so the wire
contract has one definition. Failures are sorted into two kinds:

* transient -- connection errors, timeouts, 408/425/429 and every 5xx: retried by the
  :class:`~trainer.retry.RetryPolicy` (exponential backoff with jitter, honouring
  ``Retry-After``, until ``max_attempts`` or ``deadline_s`` runs out: long enough to outlive a
  restart);
* fatal -- any other 4xx: raised at once as :class:`ServiceError` with the server's message
  (the OpenAI error body names the field and position), because sending it again cannot help.

Pushing weights (versions, transports) is :mod:`trainer.weight_sync`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import httpx
import numpy as np
import tenacity

from services.protocol import (
    InfoResponse,
    RolloutItem,
    RolloutRequest,
    RolloutResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreSequence,
    WeightsLoadRequest,
    WeightsStatus,
    decode_array,
)
from trainer.retry import RetriesExhausted, RetryPolicy, TransientFailure, parse_retry_after

__all__ = [
    "RolloutClient",
    "ServiceClient",
    "ServiceError",
    "ServiceUnavailable",
    "TeacherClient",
    "TokenScores",
    "map_concurrently",
    "rollout_item_arrays",
]

log = logging.getLogger("opd.trainer.clients")

T = TypeVar("T")
R = TypeVar("R")

#: Statuses worth sending again: timeouts, rate limits and every server-side failure.
RETRYABLE_4XX = frozenset({408, 425, 429})


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
    ) -> httpx.Response:
        """Send one request, retrying transient failures; return the 2xx/3xx response.

        ``content`` is a factory so a streamed body can be produced afresh for each attempt.

        Raises:
            ServiceError: a non-retryable status (the server's error message included).
            ServiceUnavailable: transient failures outlasted the retry policy.
        """
        url = f"{self.base_url}{path}"

        def attempt() -> httpx.Response:
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
                raise TransientFailure(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code < 400:
                return resp
            message = _error_message(resp)
            if resp.status_code < 500 and resp.status_code not in RETRYABLE_4XX:
                raise ServiceError(self.name, method, url, resp.status_code, message)
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise TransientFailure(f"HTTP {resp.status_code}: {message}", retry_after)

        def on_retry(attempt_number: int, delay: float, failure: str) -> None:
            log.warning(
                "%s %s %s failed (%s); retry %d in %.1fs",
                self.name,
                method,
                path,
                failure,
                attempt_number,
                delay,
            )

        try:
            return self.retry.call(attempt, rng=self._rng, sleep=self._sleep, on_retry=on_retry)
        except RetriesExhausted as exc:
            raise ServiceUnavailable(self.name, method, url, None, str(exc)) from None

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

        The polls back off from ``poll_s`` by 1.5x up to 10 s.

        Raises:
            ServiceError: the service refused the API key (401/403).
            ServiceUnavailable: not ready within ``timeout_s``; says what was seen last.
        """
        url = f"{self.base_url}/ready"

        def poll() -> None:
            try:
                resp = self._http.get("/ready")
            except httpx.TransportError as exc:
                raise TransientFailure(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code in (401, 403):
                raise ServiceError(
                    self.name,
                    "GET",
                    url,
                    resp.status_code,
                    "refused: check the API key (services.api_key_env)",
                )
            if resp.status_code != 200:
                raise TransientFailure(
                    f"/ready answered {resp.status_code}: {_error_message(resp)}"
                )

        polling = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientFailure),
            wait=tenacity.wait_exponential(multiplier=poll_s, exp_base=1.5, max=10.0),
            stop=tenacity.stop_before_delay(timeout_s),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            polling(poll)
        except TransientFailure as exc:
            raise ServiceUnavailable(
                self.name,
                "GET",
                url,
                None,
                f"not ready after {timeout_s:.0f}s (last: {exc}). Is the {self.name} service "
                f"running at {self.base_url}? Start it with `opd {self.name} --model ...` or "
                "fix services.*_url",
            ) from None
        return self.info()

    def probe_ready(self, timeout_s: float = 5.0) -> str | None:
        """One ``GET /ready`` without retries: None when it answers 200, else what went wrong
        (for a replica pool deciding whether to take a replica back)."""
        try:
            resp = self._http.get("/ready", timeout=timeout_s)
        except httpx.TransportError as exc:
            return f"/ready: {type(exc).__name__}: {exc}"
        if resp.status_code == 200:
            return None
        return f"/ready answered {resp.status_code}: {_error_message(resp)}"


class TokenScores(NamedTuple):
    """The teacher's scores of one response: ``logprobs [R]`` of the sampled tokens and, when
    asked for (``top_k > 0``), its ``top_k`` most likely tokens at each position
    (``top_ids [R, K]`` int64, ``top_logprobs [R, K]`` float32, in rank order)."""

    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


class TeacherClient(ServiceClient):
    """The teacher: ``POST /v1/score`` of token-id sequences."""

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_k: int = 0,
        sequences_per_request: int = 64,
        max_concurrency: int = 8,
    ) -> list[TokenScores]:
        """Teacher logprob of every response token given the prompt and earlier tokens.

        Sequence ``i`` is sent as ``token_ids = prompts[i] + responses[i]`` with
        ``start = len(prompts[i])``; the answer's ``logprobs`` are float32
        ``[len(responses[i])]``. Empty responses are not sent (their answer is empty).
        """
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        out = [_empty_scores(top_k) for _ in responses]
        todo = [i for i, r in enumerate(responses) if len(r) > 0]
        chunks = [
            todo[k : k + sequences_per_request] for k in range(0, len(todo), sequences_per_request)
        ]
        url = f"{self.base_url}/v1/score"

        def one(chunk: list[int]) -> list[TokenScores]:
            body = ScoreRequest(
                sequences=[
                    ScoreSequence(
                        token_ids=[int(t) for t in prompts[i]] + [int(t) for t in responses[i]],
                        start=len(prompts[i]),
                    )
                    for i in chunk
                ],
                temperature=temperature,
                top_k=top_k,
                encoding="base64",
            )
            answer = ScoreResponse.model_validate(
                self.post_json("/v1/score", body.model_dump(mode="json", exclude_none=True))
            )
            got: list[TokenScores | None] = [None] * len(chunk)
            for item in answer.data:
                if 0 <= item.index < len(chunk):
                    got[item.index] = _item_scores(item, top_k)
            for j, i in enumerate(chunk):
                scores = got[j]
                n = len(responses[i])
                if scores is None or not _shaped(scores, n, top_k):
                    shape = None if scores is None else _shape_of(scores)
                    raise ServiceError(
                        self.name,
                        "POST",
                        url,
                        200,
                        f"sequence {j}: expected scores of {n} tokens (top_k {top_k}), got {shape}",
                    )
            return got  # type: ignore[return-value]

        for chunk, result in zip(
            chunks, map_concurrently(one, chunks, max_concurrency), strict=True
        ):
            for i, scores in zip(chunk, result, strict=True):
                out[i] = scores
        return out


def _empty_scores(top_k: int) -> TokenScores:
    if not top_k:
        return TokenScores(np.zeros(0, np.float32))
    return TokenScores(
        np.zeros(0, np.float32), np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32)
    )


def _item_scores(item: ScoreItem, top_k: int) -> TokenScores:
    logprobs = decode_array(item.logprobs).astype(np.float32, copy=False).reshape(-1)
    if not top_k or item.top_token_ids is None or item.top_logprobs is None:
        return TokenScores(logprobs)
    ids = decode_array(item.top_token_ids).astype(np.int64, copy=False)
    lps = decode_array(item.top_logprobs).astype(np.float32, copy=False)
    return TokenScores(logprobs, ids.reshape(-1, top_k), lps.reshape(-1, top_k))


def _shaped(scores: TokenScores, n: int, top_k: int) -> bool:
    if len(scores.logprobs) != n:
        return False
    if not top_k:
        return True
    return (
        scores.top_ids is not None
        and scores.top_logprobs is not None
        and scores.top_ids.shape == (n, top_k)
        and scores.top_logprobs.shape == (n, top_k)
    )


def _shape_of(scores: TokenScores) -> str:
    top = None if scores.top_ids is None else tuple(scores.top_ids.shape)
    return f"{len(scores.logprobs)} logprobs, top-k {top}"


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
