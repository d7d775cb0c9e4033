"""HTTP clients against fake servers (httpx.MockTransport): retries with backoff and
Retry-After (trainer.retry), fatal 4xx, readiness polling, base64 decoding, the weight sync's
versioning, restart recovery and load->upload fallback (trainer.weight_sync); the start-up
compatibility checks (trainer.service_checks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest

from services.protocol import B64Array, InfoResponse
from trainer.clients import (
    RolloutClient,
    ServiceClient,
    ServiceError,
    ServiceUnavailable,
    TeacherClient,
)
from trainer.config import load_config
from trainer.errors import StartupError
from trainer.retry import RetryPolicy, parse_retry_after
from trainer.service_checks import check_services
from trainer.weight_sync import WeightSync


class Flaky:
    """A handler that answers the scripted responses in order, then 200 {"ok": true}."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        return httpx.Response(200, json={"ok": True})


def _client(handler, sleeps: list[float], **retry) -> ServiceClient:
    return ServiceClient(
        "teacher",
        "http://fake",
        retry=RetryPolicy(
            **{"max_attempts": 6, "deadline_s": 1000, "initial_s": 0.5, "max_s": 4.0, **retry}
        ),
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
    )


def test_transient_failures_are_retried_with_backoff_and_retry_after() -> None:
    handler = Flaky(
        [
            httpx.ConnectError("refused"),
            httpx.Response(503, headers={"Retry-After": "3"}, json={"error": {"message": "busy"}}),
            httpx.Response(429, headers={"Retry-After": "2"}),
            httpx.Response(502, text="bad gateway"),
            httpx.ReadTimeout("slow"),
        ]
    )
    sleeps: list[float] = []
    assert _client(handler, sleeps).post_json("/v1/score", {}) == {"ok": True}
    assert handler.calls == 6
    assert 0.25 <= sleeps[0] <= 0.5  # attempt 1: 0.5 * [0.5, 1]
    assert sleeps[1] >= 3.0  # Retry-After is a lower bound
    assert sleeps[2] >= 2.0
    assert 2.0 <= sleeps[3] <= 4.0  # attempt 4: min(4, 0.5 * 8) * [0.5, 1]
    assert sleeps[4] <= 4.0  # capped at max_s


def test_fatal_4xx_is_not_retried_and_carries_the_server_message() -> None:
    body = {
        "error": {
            "message": "sequences[3].start: out of range",
            "type": "invalid_request_error",
            "param": "start",
        }
    }
    handler = Flaky([httpx.Response(400, json=body)])
    sleeps: list[float] = []
    with pytest.raises(ServiceError) as err:
        _client(handler, sleeps).post_json("/v1/score", {})
    assert handler.calls == 1 and not sleeps
    assert err.value.status == 400 and "sequences[3].start: out of range" in str(err.value)


def test_gives_up_after_max_attempts_or_deadline() -> None:
    handler = Flaky([httpx.Response(503)] * 100)
    sleeps: list[float] = []
    with pytest.raises(ServiceUnavailable, match="gave up after 6 attempt"):
        _client(handler, sleeps).get_json("/info")
    assert handler.calls == 6
    handler = Flaky([httpx.ConnectError("down")] * 100)
    with pytest.raises(ServiceUnavailable, match="ConnectError"):
        _client(handler, [], max_attempts=100, deadline_s=3.0).get_json("/info")
    assert handler.calls < 100


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_s=1.0, max_s=10.0)
    rng = random.Random(0)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        values = [policy.delay(attempt, None, rng) for _ in range(50)]
        assert all(base / 2 <= v <= base for v in values)
        assert max(values) - min(values) > 0  # jitter
    assert policy.delay(1, 7.0, rng) >= 7.0
    assert (
        parse_retry_after("5") == 5.0
        and parse_retry_after(None) is None
        and parse_retry_after("soon") is None
    )
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 1  # a date in the past


def test_wait_ready_polls_until_ready_then_reads_info() -> None:
    info = _info("teacher")
    state = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            state["n"] += 1
            if state["n"] < 3:
                return httpx.Response(503, json={"error": {"message": "loading"}})
            return httpx.Response(200, json={"status": "ready"})
        return httpx.Response(200, json=info)

    sleeps: list[float] = []
    got = _client(handler, sleeps).wait_ready(timeout_s=60)
    assert got.tokenizer_fingerprint == "abc" and state["n"] == 3

    def never(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(
        ServiceUnavailable, match="not ready after 2s.*ConnectError.*Is the teacher service running"
    ):
        _client(never, []).wait_ready(timeout_s=2)


def test_teacher_score_sends_ids_with_start_and_decodes_base64() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        assert body["encoding"] == "base64"
        data = []
        for i, seq in enumerate(body["sequences"]):
            n = len(seq["token_ids"]) - seq["start"]
            lp = -np.arange(1, n + 1, dtype=np.float32) / 10
            data.append(
                {
                    "index": i,
                    "start": seq["start"],
                    "token_ids": B64Array.encode(seq["token_ids"], "int32").model_dump(),
                    "logprobs": B64Array.encode(lp, "float32").model_dump(),
                }
            )
        return httpx.Response(
            200,
            json={"model": "t", "data": data, "usage": {"prompt_tokens": 0, "scored_tokens": 0}},
        )

    teacher = TeacherClient("teacher", "http://fake", transport=httpx.MockTransport(handler))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8]]
    responses = [[9, 9], [], [5, 5, 5], [1]]
    out = teacher.score(
        prompts, responses, temperature=1.0, sequences_per_request=2, max_concurrency=2
    )
    assert [len(x.logprobs) for x in out] == [2, 0, 3, 1]
    assert all(x.top_ids is None for x in out)  # top_k 0: no alternatives asked for
    np.testing.assert_allclose(out[2].logprobs, [-0.1, -0.2, -0.3], rtol=1e-6)
    sent = [s for body in seen for s in body["sequences"]]
    assert {tuple(s["token_ids"]): s["start"] for s in sent} == {
        (1, 2, 3, 9, 9): 3,
        (6, 5, 5, 5): 1,
        (7, 8, 1): 2,
    }
    assert len(seen) == 2  # the empty response is not sent; 3 sequences in chunks of 2


def test_teacher_score_returns_the_top_k_it_asked_for() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["top_k"] == 2
        data = []
        for i, seq in enumerate(body["sequences"]):
            n = len(seq["token_ids"]) - seq["start"]
            data.append(
                {
                    "index": i,
                    "start": seq["start"],
                    "token_ids": seq["token_ids"],
                    "logprobs": [-1.0] * n,
                    "top_token_ids": [[3, 4]] * n,
                    "top_logprobs": [[-0.5, -1.5]] * n,
                }
            )
        return httpx.Response(
            200,
            json={"model": "t", "data": data, "usage": {"prompt_tokens": 0, "scored_tokens": 0}},
        )

    teacher = TeacherClient("teacher", "http://fake", transport=httpx.MockTransport(handler))
    (a, b) = teacher.score([[1], [2]], [[5, 6, 7], []], temperature=1.0, top_k=2)
    assert a.top_ids is not None and a.top_ids.shape == (3, 2) and a.top_ids.dtype == np.int64
    np.testing.assert_array_equal(a.top_logprobs, [[-0.5, -1.5]] * 3)
    assert b.top_ids is not None and b.top_ids.shape == (0, 2)  # empty: not sent, still shaped

    def short(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(
            200,
            json={
                "model": "t",
                "usage": {"prompt_tokens": 0, "scored_tokens": 0},
                "data": [
                    {
                        "index": 0,
                        "start": 1,
                        "token_ids": body["sequences"][0]["token_ids"],
                        "logprobs": [-1.0],
                    }
                ],  # no top-k although asked
            },
        )

    teacher = TeacherClient("teacher", "http://fake", transport=httpx.MockTransport(short))
    with pytest.raises(ServiceError, match="top_k 2"):
        teacher.score([[1]], [[5]], temperature=1.0, top_k=2)


class FakeRollout:
    """The weights routes of a rollout service, with versions that only grow."""

    def __init__(self, weights_dir: Path | None = None) -> None:
        self.version = 0
        self.weights_dir = weights_dir
        self.uploads: list[int] = []
        self.loads: list[tuple[str, int]] = []
        self.fail_next_put_after_applying = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/weights" and request.method == "GET":
            return httpx.Response(
                200, json={"policy_version": self.version, "loaded_at": 0.0, "source": "x"}
            )
        if path == "/v1/weights/load":
            body = json.loads(request.content)
            if self.weights_dir is None or not Path(body["path"]).resolve().is_relative_to(
                self.weights_dir
            ):
                return httpx.Response(
                    403, json={"error": {"message": "path outside weights_dir", "param": "path"}}
                )
            return self._apply(
                body["version"], lambda: self.loads.append((body["path"], body["version"]))
            )
        if path == "/v1/weights" and request.method == "PUT":
            version = int(request.url.params["version"])
            assert request.content[:8]  # a body was streamed
            return self._apply(version, lambda: self.uploads.append(version))
        return httpx.Response(404)

    def _apply(self, version: int, record) -> httpx.Response:
        if version <= self.version:
            return httpx.Response(409, json={"error": {"message": "not newer", "param": "version"}})
        self.version = version
        record()
        if self.fail_next_put_after_applying:
            self.fail_next_put_after_applying = False
            return httpx.Response(503)  # applied, but the answer got lost: the retry sees 409
        return httpx.Response(
            200, json={"policy_version": version, "loaded_at": 0.0, "source": "upload"}
        )


def _writer(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


def _rollout(fake: FakeRollout) -> RolloutClient:
    return RolloutClient(
        "rollout",
        "http://fake",
        transport=httpx.MockTransport(fake),
        retry=RetryPolicy(max_attempts=3, initial_s=0.001, max_s=0.001),
    )


def test_weight_sync_upload_versions_and_restart_recovery(tmp_path: Path) -> None:
    fake = FakeRollout()
    fake.version = 4  # the service already served something newer than a fresh trainer
    sync = WeightSync(_rollout(fake), method="auto", staging_dir=tmp_path / "w")
    assert sync.method == "upload"
    assert sync.start(_writer) == 5
    assert sync.push(_writer) == 6
    assert fake.uploads == [5, 6]
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["v000000006"]  # older pruned

    # A retried PUT whose first attempt was applied: 409 on the retry, resolved via GET.
    fake.fail_next_put_after_applying = True
    assert sync.push(_writer) == 7 and fake.version == 7

    # Restart: the service comes back at version 0 with its initial weights.
    fake.version = 0
    assert not sync.restore(served_version=7, expected_min=7)
    assert sync.restore(served_version=0, expected_min=7)
    assert fake.version == 7 and fake.uploads[-1] == 7


def test_weight_sync_load_by_path_and_auto_fallback(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    fake = FakeRollout(weights_dir=shared.resolve())
    sync = WeightSync(_rollout(fake), method="load", staging_dir=tmp_path / "w", shared_dir=shared)
    assert sync.start(_writer) == 1
    assert fake.loads == [(str((shared / "v000000001").resolve()), 1)]
    assert (shared / "v000000001" / "model.safetensors").is_file()

    # auto + a service that refuses the path (no shared disk): upload from then on.
    other = FakeRollout(weights_dir=None)
    sync = WeightSync(
        _rollout(other), method="auto", staging_dir=tmp_path / "w2", shared_dir=tmp_path / "s2"
    )
    assert sync.start(_writer) == 1 and sync.push(_writer) == 2
    assert other.uploads == [1, 2] and sync.method == "upload"

    # load (explicit) never falls back: the 403 is the answer.
    sync = WeightSync(
        _rollout(FakeRollout(None)),
        method="load",
        staging_dir=tmp_path / "w3",
        shared_dir=tmp_path / "s3",
    )
    with pytest.raises(ServiceError, match="403"):
        sync.start(_writer)


def _info(service: str, fingerprint: str = "abc", max_len: int = 4096, model: str = "m") -> dict:
    return {
        "service": service,
        "model": model,
        "served_model_name": model,
        "backend": "hf",
        "dtype": "float32",
        "device": "cpu",
        "max_model_len": max_len,
        "vocab_size": 10,
        "tokenizer_fingerprint": fingerprint,
        "eos_token_ids": [1],
        "limits": {},
        "policy_version": 0 if service == "student_rollout" else None,
        "version": "0",
    }


def test_startup_checks_refuse_incompatible_services() -> None:
    cfg = load_config(None, ["student.model=s", "teacher.model=Qwen/Teacher-7B"])
    t = InfoResponse.model_validate(_info("teacher", model="/models/Teacher-7B"))
    r = InfoResponse.model_validate(_info("student_rollout"))
    check_services(cfg, t, r, local_fingerprint="abc")  # compatible: no error

    bad = InfoResponse.model_validate(
        _info("teacher", fingerprint="zzz", model="/models/Teacher-7B")
    )
    with pytest.raises(StartupError, match="tokenizer mismatch.*same token ids"):
        check_services(cfg, bad, r)
    with pytest.raises(StartupError, match="trainer's student tokenizer"):
        check_services(cfg, t, r, local_fingerprint="other")
    with pytest.raises(StartupError, match="URLs swapped"):
        check_services(cfg, r, t)
    with pytest.raises(StartupError, match="teacher.model is"):
        check_services(cfg, InfoResponse.model_validate(_info("teacher", model="other")), r)
    with pytest.raises(StartupError, match="max_model_len is 1024"):
        check_services(
            cfg, InfoResponse.model_validate(_info("teacher", max_len=1024, model="Teacher-7B")), r
        )
    # Published per-part fingerprints: a chat-template-only difference is accepted.
    parts_t = {
        "vocab": "1",
        "model": "2",
        "added_tokens": "3",
        "special_tokens": "4",
        "chat_template": "a",
    }
    check_services(cfg, bad, r, components=(parts_t, {**parts_t, "chat_template": "b"}))
    with pytest.raises(StartupError, match="differing parts: vocab"):
        check_services(cfg, bad, r, components=(parts_t, {**parts_t, "vocab": "x"}))
