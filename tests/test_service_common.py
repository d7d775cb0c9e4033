"""services/common in-process, with a fake engine: settings, lifecycle, errors, limits, metrics.

Fast (no model, no subprocess): the behaviours that are hard to provoke through a real model
(an engine that raises, a load that fails, a request that outlives its timeout) are checked
here; tests/test_teacher_http.py checks the real thing end to end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from services.common.settings import SERVICE_ENGINE_FIELDS, ServiceSettings, parse_settings

# The same names the engine backends import (an import list, not logic).
from services.engine.base import (
    Engine,
    EngineConfig,
    EngineInfo,
    GeneratedSample,
    SamplingSpec,
    ScoreInput,
    ScoreResult,
)
from services.student_rollout.settings import RolloutSettings
from services.teacher.app import TeacherSettings, build_app


class FakeTokenizer:
    eos_token_id = 0
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + (ord(c) % 60) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(64 + (i % 60)) for i in ids)

    def apply_chat_template(self, messages: Any, tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages) + ">"


class FakeEngine(Engine):
    """logprob of token t at any position = -t / 10 / temperature; knobs to misbehave."""

    def __init__(self, fail_load: bool = False) -> None:
        self.config = EngineConfig(model="fake")
        self.release_load = threading.Event()
        self.release_load.set()
        self.fail_load = fail_load
        self.raise_next = False
        self.score_delay = 0.0
        self.shut = False
        self.broken: str | None = None

    @property
    def tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    async def start(self) -> None:
        await asyncio.to_thread(self.release_load.wait, 30)
        if self.fail_load:
            raise RuntimeError("weights are corrupt")

    async def shutdown(self) -> None:
        self.shut = True

    def info(self) -> EngineInfo:
        return EngineInfo(model="fake", served_model_name="fake", backend="hf",
                          dtype="float32", device="cpu", max_model_len=32, vocab_size=64,
                          tokenizer_fingerprint="0" * 64, eos_token_ids=[0])

    async def score(self, inputs: Sequence[ScoreInput]) -> list[ScoreResult]:
        if self.score_delay:
            await asyncio.sleep(self.score_delay)
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = []
        for inp in inputs:
            ids = np.asarray(inp.token_ids[inp.start:], np.float32)
            res = ScoreResult(logprobs=-ids / 10 / inp.temperature)
            if inp.top_k:
                res.top_token_ids = np.tile(np.arange(inp.top_k, dtype=np.int32), (len(ids), 1))
                res.top_logprobs = -res.top_token_ids.astype(np.float32) / 10
            out.append(res)
        return out

    async def generate(self, prompts: Sequence[list[int]], spec: SamplingSpec
                       ) -> list[list[GeneratedSample]]:
        return [[GeneratedSample(token_ids=[5] * spec.max_tokens,
                                 logprobs=[-0.5] * spec.max_tokens, text="E" * spec.max_tokens,
                                 finish_reason="length",
                                 top_logprobs=[{5: -0.5, 6: -1.0}] * spec.max_tokens)
                 for _ in range(spec.n)] for _ in prompts]

    def health(self) -> str | None:
        return self.broken

    async def load_weights(self, checkpoint_dir: str) -> None:
        raise NotImplementedError


def _app(engine: FakeEngine, **overrides: Any) -> Any:
    settings = TeacherSettings(model="fake", **overrides)
    return build_app(settings, engine=engine)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# --------------------------------------------------------------------------- settings


def test_settings_precedence_cli_over_env_over_default(monkeypatch) -> None:
    monkeypatch.setenv("OPD_MODEL", "from-env")
    monkeypatch.setenv("OPD_MAX_TOP_K", "7")
    monkeypatch.setenv("OPD_ENFORCE_EAGER", "true")
    s = parse_settings(TeacherSettings, ["--max-top-k", "9", "--max-model-len", "2048"])
    assert s.model == "from-env" and s.max_top_k == 9 and s.max_model_len == 2048
    assert s.enforce_eager is True and s.port == 8001 and s.max_n == 64
    s = parse_settings(TeacherSettings, ["--no-enforce-eager", "--model", "cli",
                                         "--api-key", "sekrit", "--served-model-name", "none"])
    assert s.enforce_eager is False and s.model == "cli" and s.api_key_value() == "sekrit"
    assert s.served_model_name is None
    assert "sekrit" not in repr(s)  # the key is a secret


def test_settings_mirror_engine_config_and_refuse_bad_values(monkeypatch, capsys) -> None:
    # Every engine knob is a flag, except what each service decides itself.
    flags = set(EngineConfig.model_fields) - SERVICE_ENGINE_FIELDS
    assert flags <= set(ServiceSettings.model_fields)
    assert not SERVICE_ENGINE_FIELDS & set(ServiceSettings.model_fields)
    cfg = TeacherSettings(model="m", backend="vllm", dtype="float32",
                          enforce_eager=True).engine_config()
    assert (cfg.model, cfg.backend, cfg.dtype, cfg.enforce_eager) == ("m", "vllm", "float32",
                                                                      True)
    # The rollout service takes weights by broadcast (vLLM's weight transfer); the teacher not.
    assert cfg.weight_transfer is False
    assert RolloutSettings(model="m", backend="vllm").engine_config().weight_transfer is True
    monkeypatch.delenv("OPD_MODEL", raising=False)
    with pytest.raises(SystemExit) as exc:
        parse_settings(TeacherSettings, ["--max-top-k", "-3", "--model", "m"])
    assert exc.value.code == 2 and "--max-top-k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(TeacherSettings, [])  # --model is required
    assert "--model" in capsys.readouterr().err


# --------------------------------------------------------------------------- lifecycle


def test_health_at_once_ready_after_load_then_shutdown() -> None:
    engine = FakeEngine()
    engine.release_load.clear()
    with TestClient(_app(engine)) as client:
        assert client.get("/health").json()["engine"] == "loading"
        r = client.get("/ready")
        assert r.status_code == 503 and r.headers["Retry-After"]
        r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2]}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert client.get("/info").status_code == 503
        engine.release_load.set()
        _wait_ready(client)
        assert client.get("/info").json()["model"] == "fake"
    assert engine.shut


def test_failed_load_is_reported_on_ready() -> None:
    with TestClient(_app(FakeEngine(fail_load=True))) as client:
        deadline = time.monotonic() + 10
        while "failed" not in client.get("/ready").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.get("/ready")
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_a_dead_engine_turns_ready_503_and_back() -> None:
    engine = FakeEngine()
    with TestClient(_app(engine)) as client:
        _wait_ready(client)
        engine.broken = "the vLLM engine core died: EngineDeadError"
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_broken"
        assert "engine core died" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # the process is up; the engine is not
        engine.broken = None
        assert client.get("/ready").status_code == 200


# --------------------------------------------------------------------------- errors, limits


def test_engine_exception_is_a_500_for_that_request_only() -> None:
    engine = FakeEngine()
    with TestClient(_app(engine), raise_server_exceptions=False) as client:
        _wait_ready(client)
        engine.raise_next = True
        r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2]}]})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "internal_server_error"
        r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2, 3]}]})
        assert r.status_code == 200 and r.json()["data"][0]["logprobs"] == pytest.approx(
            [-0.2, -0.3])
        assert 'status="500"' in client.get("/metrics").text


def test_request_timeout_is_503() -> None:
    engine = FakeEngine()
    with TestClient(_app(engine, request_timeout_s=0.2)) as client:
        _wait_ready(client)
        engine.score_delay = 2.0
        r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2]}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
        assert "Retry-After" in r.headers
        engine.score_delay = 0.0
        assert client.post("/v1/score",
                           json={"sequences": [{"token_ids": [1, 2]}]}).status_code == 200


def test_capacity_gate_429_and_queue_depth() -> None:
    engine = FakeEngine()
    with TestClient(_app(engine, max_concurrent_requests=2, retry_after_s=7)) as client:
        _wait_ready(client)
        engine.score_delay = 1.0
        statuses: list[int] = []

        def slow() -> None:
            statuses.append(client.post(
                "/v1/score", json={"sequences": [{"token_ids": [1, 2]}]}).status_code)

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while 'opd_queue_depth{service="teacher"} 2.0' not in client.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.post("/v1/score", json={"sequences": [{"token_ids": [1, 2]}]})
        assert r.status_code == 429 and r.headers["Retry-After"] == "7"
        assert client.get("/health").status_code == 200  # GETs are never gated
        for t in threads:
            t.join()
        assert statuses == [200, 200]
        assert 'opd_queue_depth{service="teacher"} 0.0' in client.get("/metrics").text


def test_validation_messages_name_field_index_and_position() -> None:
    with TestClient(_app(FakeEngine(), max_sequences_per_request=3,
                         max_tokens_per_request=20)) as client:
        _wait_ready(client)
        cases = [
            ({"sequences": [{"token_ids": [1, 2]}] * 4}, "sequences", "max_sequences_per_request"),
            ({"sequences": [{"token_ids": [1] * 15}, {"token_ids": [1] * 15}]}, "sequences",
             "max_tokens_per_request"),
            ({"sequences": [{"token_ids": [1, 2]}, {"token_ids": [3, 64]}]},
             "sequences.1.token_ids", "sequences[1].token_ids[1]: token id 64 is outside the "
                                      "vocabulary (0..63)"),
            ({"sequences": [{"token_ids": [1, 2]}], "top_k": 999}, "top_k", "max_top_k"),
            ({"sequences": [{"token_ids": [1, 2.5]}]}, "sequences.0.token_ids",
             "sequences[0].token_ids[1]"),
            ({"sequences": [{"token_ids": [1, 2]}], "model": "other"}, "model", "other"),
        ]
        for body, param, words in cases:
            r = client.post("/v1/score", json=body)
            assert 400 <= r.status_code < 500, r.text
            assert r.json()["error"]["param"] == param, r.text
            assert words in r.json()["error"]["message"], r.text


def test_openai_routes_with_fake_engine() -> None:
    with TestClient(_app(FakeEngine())) as client:
        _wait_ready(client)
        r = client.post("/v1/completions", json={"prompt": ["ab", "c"], "max_tokens": 2,
                                                 "n": 2, "logprobs": 1, "echo": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert out["choices"][0]["text"] == "abEE"
        lp = out["choices"][0]["logprobs"]
        # echo: prompt (first null) + generated, scored at temperature 1
        assert lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1] == pytest.approx(-(1 + ord("b") % 60) / 10)
        assert lp["token_logprobs"][2:] == [-0.5, -0.5]
        assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = client.post("/v1/completions", json={"prompt": "ab", "presence_penalty": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 1, "n": None, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert '"content":"EE"' in r.text
