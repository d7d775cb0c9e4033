"""The teacher over real HTTP: a uvicorn subprocess per configuration, the tiny random teacher.

hf backend: `/v1/score` against a direct transformers forward (float32, 1e-4 abs), top-k,
temperature, base64, the echo form of `/v1/completions`, text and chat forms, the official
`openai` client, every bad input of docs/design.md §7, 32 concurrent requests, 429 over
capacity. The vllm backend is tests/test_teacher_vllm.py (its teacher starts loading here).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from services.protocol import decode_array
from tests.servers import ServerHandle, start_server
from tests.teacher_reference import Reference, _random_ids, ref
from tests.teacher_servers import (
    AUTH,
    KEY,
    MAX_BODY,
    MAX_MODEL_LEN,
    MAX_N,
    MAX_TOP_K,
    NAME,
    _server_args,
    _vllm_available,
    start_vllm_early,
    vllm_tests_follow,
)

__all__ = ["ref"]  # the reference fixture, shared with tests/test_teacher_vllm.py

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_servers(request, tiny_models) -> Any:
    """Two hf teachers, loading in parallel: the main one (API key on, small limits so each can
    be hit cheaply) and one with max_concurrent_requests=1 for the capacity test.

    When vllm tests (tests/test_teacher_vllm.py) run after these, the ONE vLLM teacher starts
    loading now, in the background, so its slow start (three processes importing vllm) overlaps
    the hf tests instead of following them; `vllm_teacher` takes it over.
    """
    main = start_server("services.teacher",
                        _server_args(tiny_models["teacher"], "hf", "--device", "cpu"),
                        env={"OPD_API_KEY": KEY}, wait=False)
    narrow = start_server("services.teacher",
                          _server_args(tiny_models["teacher"], "hf", "--device", "cpu",
                                       "--max-concurrent-requests", "1", "--retry-after-s", "3"),
                          wait=False)
    if _vllm_available() and vllm_tests_follow(request):
        start_vllm_early(request.config, tiny_models)
    try:
        yield {"main": main.wait_ready(180), "narrow": narrow.wait_ready(180)}
    finally:
        for srv in (main, narrow):
            srv.stop()


@pytest.fixture(scope="module")
def teacher(hf_servers) -> ServerHandle:
    return hf_servers["main"]


@pytest.fixture(scope="module")
def client(teacher: ServerHandle) -> Any:
    with httpx.Client(base_url=teacher.base_url, headers=AUTH, timeout=60) as c:
        yield c


def _ok_request(client: httpx.Client) -> None:
    """The server still answers a correct request."""
    r = client.post("/v1/score", json={"sequences": [{"token_ids": [5, 6, 7, 8]}]})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["logprobs"]) == 3


# =========================================================================== hf: numbers


def test_probes_and_info(teacher: ServerHandle, client: httpx.Client) -> None:
    # Probes and metrics are open; /info needs the key.
    assert httpx.get(teacher.base_url + "/health").json()["status"] == "ok"
    assert httpx.get(teacher.base_url + "/ready").status_code == 200
    assert httpx.get(teacher.base_url + "/metrics").status_code == 200
    assert httpx.get(teacher.base_url + "/info").status_code == 401
    info = client.get("/info").json()
    assert info["service"] == "teacher" and info["backend"] == "hf"
    assert info["served_model_name"] == NAME and info["max_model_len"] == MAX_MODEL_LEN
    assert info["vocab_size"] == 512 and len(info["tokenizer_fingerprint"]) == 64
    assert "chat_template" in info["tokenizer_fingerprint_components"]
    assert info["limits"]["max_top_k"] == MAX_TOP_K and info["limits"]["max_n"] == MAX_N
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]


def test_score_matches_transformers_with_top_k(client: httpx.Client, ref: Reference) -> None:
    rng = np.random.default_rng(0)
    seqs = [(_random_ids(rng, n), s) for n, s in [(2, 1), (17, 1), (40, 9), (MAX_MODEL_LEN, 100)]]
    body = {"model": NAME, "top_k": 5,
            "sequences": [{"token_ids": ids, "start": s} for ids, s in seqs]}
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == NAME
    assert out["usage"] == {"prompt_tokens": sum(len(i) for i, _ in seqs),
                            "scored_tokens": sum(len(i) - s for i, s in seqs)}
    for k, (ids, start) in enumerate(seqs):
        item = out["data"][k]
        assert item["index"] == k and item["start"] == start and item["token_ids"] == ids
        values, top_ids, top_lps = ref.logprobs(ids, start, top_k=5)
        np.testing.assert_allclose(item["logprobs"], values, atol=TOL, rtol=0)
        np.testing.assert_array_equal(item["top_token_ids"], top_ids)
        np.testing.assert_allclose(item["top_logprobs"], top_lps, atol=TOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_score_temperature(client: httpx.Client, ref: Reference, temperature: float) -> None:
    ids = _random_ids(np.random.default_rng(1), 30)
    r = client.post("/v1/score", json={"sequences": [{"token_ids": ids, "start": 3}],
                                       "temperature": temperature, "top_k": 3})
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    values, top_ids, top_lps = ref.logprobs(ids, 3, temperature, top_k=3)
    np.testing.assert_allclose(item["logprobs"], values, atol=TOL, rtol=0)
    np.testing.assert_array_equal(item["top_token_ids"], top_ids)
    np.testing.assert_allclose(item["top_logprobs"], top_lps, atol=TOL, rtol=0)
    # and it differs from T = 1 (the parameter is not ignored)
    assert np.abs(values - ref.logprobs(ids, 3)[0]).max() > 1e-2


def test_base64_round_trips_to_the_json_numbers(client: httpx.Client) -> None:
    rng = np.random.default_rng(2)
    body = {"sequences": [{"token_ids": _random_ids(rng, 25), "start": 4},
                          {"token_ids": _random_ids(rng, 9)}], "top_k": 4}
    as_json = client.post("/v1/score", json=body).json()
    as_b64 = client.post("/v1/score", json={**body, "encoding": "base64"}).json()
    assert as_b64["usage"] == as_json["usage"]
    for j, b in zip(as_json["data"], as_b64["data"], strict=True):
        assert b["logprobs"]["dtype"] == "float32" and b["token_ids"]["dtype"] == "int32"
        assert b["top_logprobs"]["shape"] == [len(j["logprobs"]), 4]
        # JSON floats are the float32 values printed exactly: bit-identical after the cast.
        np.testing.assert_array_equal(decode_array(b["logprobs"]),
                                      np.asarray(j["logprobs"], np.float32))
        np.testing.assert_array_equal(decode_array(b["token_ids"]), j["token_ids"])
        np.testing.assert_array_equal(decode_array(b["top_token_ids"]), j["top_token_ids"])
        np.testing.assert_array_equal(decode_array(b["top_logprobs"]),
                                      np.asarray(j["top_logprobs"], np.float32))


def test_echo_completion_gives_the_score_numbers(client: httpx.Client, ref: Reference) -> None:
    ids = _random_ids(np.random.default_rng(3), 20)
    score = client.post("/v1/score", json={"sequences": [{"token_ids": ids}], "top_k": 3}).json()
    r = client.post("/v1/completions", json={
        "model": NAME, "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 3,
        "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [f"token_id:{t}" for t in ids]
    np.testing.assert_allclose(lp["token_logprobs"][1:], score["data"][0]["logprobs"],
                               atol=TOL, rtol=0)
    for pos, top in enumerate(lp["top_logprobs"][1:]):
        # the k most likely plus the actual token (vLLM's convention)
        expect = {f"token_id:{t}": v for t, v in zip(score["data"][0]["top_token_ids"][pos],
                                                      score["data"][0]["top_logprobs"][pos],
                                                      strict=True)}
        assert set(expect) <= set(top) and f"token_id:{ids[pos + 1]}" in top
        assert len(top) in (3, 4)
        for key, value in expect.items():
            assert abs(top[key] - value) <= TOL
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert r.json()["usage"]["completion_tokens"] == 0


def test_text_and_chat_forms(client: httpx.Client, ref: Reference) -> None:
    tok = ref.tokenizer
    prompt, completion = "Tom has 12 apples and buys", " 30 more."
    messages = [{"role": "user", "content": "How many eggs does Ana have?"}]
    r = client.post("/v1/score", json={"sequences": [
        {"prompt": prompt, "completion": completion},
        {"messages": messages, "completion": "Ana has 4 eggs."},
    ]})
    assert r.status_code == 200, r.text
    text_item, chat_item = r.json()["data"]
    # prompt and completion are tokenized apart and concatenated; scoring starts at the
    # first completion token
    p_ids = tok(prompt)["input_ids"]
    ids = p_ids + tok(completion, add_special_tokens=False)["input_ids"]
    assert text_item["token_ids"] == ids and text_item["start"] == len(p_ids)
    np.testing.assert_allclose(text_item["logprobs"], ref.logprobs(ids, len(p_ids))[0],
                               atol=TOL, rtol=0)
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    c_ids = tok(chat_text, add_special_tokens=False)["input_ids"]
    ids = c_ids + tok("Ana has 4 eggs.", add_special_tokens=False)["input_ids"]
    assert chat_item["token_ids"] == ids and chat_item["start"] == len(c_ids)
    np.testing.assert_allclose(chat_item["logprobs"], ref.logprobs(ids, len(c_ids))[0],
                               atol=TOL, rtol=0)


def test_openai_client(teacher: ServerHandle, ref: Reference) -> None:
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=teacher.base_url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in oc.models.list().data] == [NAME]

    # greedy completion: the first token is the reference argmax, its logprob the reference's
    prompt = "Tom has 12 apples"
    out = oc.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                logprobs=2, n=1)
    choice = out.choices[0]
    p_ids = ref.tokenizer(prompt)["input_ids"]
    with ref.torch.no_grad():
        logits = ref.model(ref.torch.tensor([p_ids])).logits[0, -1]
    first_lp = ref.torch.log_softmax(logits, -1)
    assert choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == out.usage.completion_tokens >= 1
    assert abs(choice.logprobs.token_logprobs[0] - float(first_lp.max())) <= TOL
    assert out.usage.prompt_tokens == len(p_ids)

    # echo-scoring through the client: prompt logprobs, first null
    echo = oc.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True,
                                 logprobs=1)
    lps = echo.choices[0].logprobs.token_logprobs
    assert echo.choices[0].text == prompt and lps[0] is None
    np.testing.assert_allclose(lps[1:], ref.logprobs(p_ids, 1)[0], atol=TOL, rtol=0)

    # n samples, seeded: reproducible
    a = oc.completions.create(model=NAME, prompt=prompt, max_tokens=5, n=2, seed=7,
                              temperature=1.0)
    b = oc.completions.create(model=NAME, prompt=prompt, max_tokens=5, n=2, seed=7,
                              temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]

    # chat with logprobs and top_logprobs, OpenAI's shape
    chat = oc.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "How many pens?"}], max_tokens=5,
        logprobs=True, top_logprobs=3, temperature=0.8, seed=1)
    c = chat.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    content = c.logprobs.content
    assert len(content) == chat.usage.completion_tokens >= 1
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob

    # streaming is accepted (one chunk per choice after generation): same text as unstreamed
    kwargs = {"model": NAME, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    streamed = "".join(ch.choices[0].text
                       for ch in oc.completions.create(stream=True, **kwargs) if ch.choices)
    assert streamed == oc.completions.create(**kwargs).choices[0].text

    # errors come back as the client's typed exceptions
    with pytest.raises(openai.BadRequestError):
        oc.completions.create(model=NAME, prompt=prompt, max_tokens=2, n=MAX_N + 1)
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="not-this-one", prompt=prompt, max_tokens=2)
    bad = openai.OpenAI(base_url=teacher.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# =========================================================================== hf: bad inputs

_OK_SEQ = {"token_ids": [5, 6, 7, 8]}

# (name, route, body, status, param, words the message must contain)
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, list[str]]] = [
    ("token_outside_vocab", "/v1/score",
     {"sequences": [_OK_SEQ, {"token_ids": [5, 6, 999999, 7]}]}, 400,
     "sequences.1.token_ids", ["sequences[1].token_ids[2]", "999999", "0..511"]),
    ("negative_token", "/v1/score", {"sequences": [{"token_ids": [5, -1]}]}, 400,
     "sequences.0.token_ids", ["sequences[0].token_ids[1]", "-1"]),
    ("over_max_model_len", "/v1/score",
     {"sequences": [{"token_ids": [5] * (MAX_MODEL_LEN + 1)}]}, 400,
     "sequences.0.token_ids", ["sequences[0]", str(MAX_MODEL_LEN + 1), "max_model_len"]),
    ("empty_sequences", "/v1/score", {"sequences": []}, 400, "sequences", ["sequences"]),
    ("empty_token_ids", "/v1/score", {"sequences": [_OK_SEQ, {"token_ids": []}]}, 400,
     "sequences.1.token_ids", ["sequences[1].token_ids", "empty"]),
    ("start_zero", "/v1/score", {"sequences": [{"token_ids": [5, 6, 7], "start": 0}]}, 400,
     "sequences.0.start", ["sequences[0].start", "0"]),
    ("start_equal_len", "/v1/score", {"sequences": [{"token_ids": [5, 6, 7], "start": 3}]},
     400, "sequences.0.start", ["sequences[0].start", "3", "len(token_ids) = 3"]),
    ("start_past_len", "/v1/score",
     {"sequences": [_OK_SEQ, _OK_SEQ, {"token_ids": [5, 6], "start": 9}]}, 400,
     "sequences.2.start", ["sequences[2].start", "9"]),
    ("top_k_over_max", "/v1/score", {"sequences": [_OK_SEQ], "top_k": MAX_TOP_K + 1}, 400,
     "top_k", ["top_k", str(MAX_TOP_K + 1), "max_top_k"]),
    ("negative_top_k", "/v1/score", {"sequences": [_OK_SEQ], "top_k": -1}, 400, "top_k",
     ["top_k"]),
    ("zero_temperature", "/v1/score", {"sequences": [_OK_SEQ], "temperature": 0}, 400,
     "temperature", ["temperature"]),
    ("token_ids_wrong_type", "/v1/score", {"sequences": [{"token_ids": [5, "six"]}]}, 400,
     "sequences.0.token_ids", ["sequences[0].token_ids[1]"]),
    ("sequences_wrong_type", "/v1/score", {"sequences": "5 6 7"}, 400, "sequences",
     ["sequences"]),
    ("top_k_wrong_type", "/v1/score", {"sequences": [_OK_SEQ], "top_k": "many"}, 400,
     "top_k", ["top_k"]),
    ("bad_encoding", "/v1/score", {"sequences": [_OK_SEQ], "encoding": "xml"}, 400,
     "encoding", ["encoding"]),
    ("two_forms", "/v1/score", {"sequences": [{"token_ids": [5, 6], "prompt": "x"}]}, 400,
     "sequences.0", ["sequences[0]", "exactly one"]),
    ("unknown_field", "/v1/score", {"sequences": [_OK_SEQ], "topk": 3}, 400, "topk",
     ["topk"]),
    ("missing_sequences", "/v1/score", {"top_k": 1}, 400, "sequences", ["sequences"]),
    ("empty_completion", "/v1/score", {"sequences": [{"prompt": "Tom", "completion": ""}]},
     400, "sequences.0.completion", ["sequences[0].completion"]),
    ("n_over_max", "/v1/completions", {"prompt": "Tom", "max_tokens": 2, "n": MAX_N + 1}, 400,
     "n", ["n", "max_n"]),
    ("logprobs_over_max", "/v1/completions",
     {"prompt": [5, 6], "max_tokens": 0, "echo": True, "logprobs": MAX_TOP_K + 1}, 400,
     "logprobs", ["logprobs", "max_top_k"]),
    ("prompt_outside_vocab", "/v1/completions",
     {"prompt": [[5, 6], [5, 600]], "max_tokens": 1}, 400, "prompt",
     ["prompt[1][1]", "600"]),
    ("prompt_plus_max_tokens_too_long", "/v1/completions",
     {"prompt": [5] * 100, "max_tokens": 50}, 400, "prompt", ["max_model_len"]),
    ("empty_prompt", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt",
     ["prompt"]),
    ("chat_no_messages", "/v1/chat/completions", {"messages": [], "max_tokens": 1}, 400,
     "messages", ["messages"]),
    ("chat_top_logprobs_over_max", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "logprobs": True,
      "top_logprobs": MAX_TOP_K + 1}, 400, "top_logprobs", ["top_logprobs"]),
    ("chat_bad_role", "/v1/chat/completions",
     {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role",
     ["messages[0].role"]),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_named_4xx(client: httpx.Client, case: tuple) -> None:
    _, route, body, status, param, words = case
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], (word, err)
    _ok_request(client)


def test_bad_json_and_wrong_body(client: httpx.Client) -> None:
    r = client.post("/v1/score", content=b'{"sequences": [{"token_ids": [1, 2,',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/score", content=b"[1, 2, 3]",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/score", content=b"", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    _ok_request(client)


def test_body_over_limit_is_413(client: httpx.Client) -> None:
    big = {"sequences": [{"token_ids": [500] * 100}] * 500}  # ~ 300 kB > MAX_BODY
    assert len(json.dumps(big)) > MAX_BODY
    r = client.post("/v1/score", json=big)  # with Content-Length
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks() -> Any:  # no Content-Length: counted while streaming
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 16384):
            yield payload[i:i + 16384]

    r = client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    _ok_request(client)


def test_auth_missing_or_wrong_key(teacher: ServerHandle, client: httpx.Client) -> None:
    url = teacher.base_url + "/v1/score"
    body = {"sequences": [_OK_SEQ]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["param"] == "Authorization"
    _ok_request(client)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/score")
    assert r.status_code == 405 and "error" in r.json()
    _ok_request(client)


# =========================================================================== hf: load


def test_32_concurrent_requests(teacher: ServerHandle, ref: Reference) -> None:
    rng = np.random.default_rng(4)
    bodies = [{"sequences": [{"token_ids": _random_ids(rng, int(rng.integers(4, 60))),
                              "start": 2}], "top_k": 2} for _ in range(32)]

    def one(body: dict) -> dict:
        r = httpx.post(teacher.base_url + "/v1/score", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(one, bodies))
    for body, out in zip(bodies, outs, strict=True):
        ids = body["sequences"][0]["token_ids"]
        np.testing.assert_allclose(out["data"][0]["logprobs"], ref.logprobs(ids, 2)[0],
                                   atol=TOL, rtol=0)


def test_metrics_are_exported(teacher: ServerHandle, client: httpx.Client) -> None:
    _ok_request(client)
    text = httpx.get(teacher.base_url + "/metrics").text
    assert 'opd_requests_total{route="/v1/score",service="teacher",status="200"}' in text
    assert 'opd_requests_total{route="/v1/score",service="teacher",status="401"}' in text \
        or "opd_rejected_total" in text
    for name in ("opd_request_seconds_bucket", "opd_tokens_scored_total",
                 "opd_prompt_tokens_total", "opd_engine_batch_size_bucket", "opd_queue_depth"):
        assert name in text, name
    assert "/v1/nothing" not in text  # raw unmatched paths never become labels


def test_over_capacity_gets_429_with_retry_after(hf_servers) -> None:
    """max_concurrent_requests=1: while a slow request (its body trickles in) holds the slot,
    the next one is refused at once with 429 + Retry-After; probes still answer."""
    srv = hf_servers["narrow"]
    release = threading.Event()
    result: dict[str, Any] = {}
    payload = json.dumps({"sequences": [{"token_ids": [5, 6, 7, 8]}]}).encode()

    def slow_body() -> Any:
        yield payload[:10]
        release.wait(30)
        yield payload[10:]

    def slow_request() -> None:
        r = httpx.post(srv.base_url + "/v1/score", content=slow_body(), timeout=60,
                       headers={"Content-Type": "application/json"})
        result["status"] = r.status_code

    thread = threading.Thread(target=slow_request)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while 'opd_queue_depth{service="teacher"} 1.0' not in httpx.get(
                srv.base_url + "/metrics").text:
            assert time.monotonic() < deadline, "slow request never admitted"
            time.sleep(0.05)
        r = httpx.post(srv.base_url + "/v1/score", json={"sequences": [_OK_SEQ]})
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "3"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(srv.base_url + "/health").status_code == 200
    finally:
        release.set()
        thread.join(60)
    assert result["status"] == 200
    r = httpx.post(srv.base_url + "/v1/score", json={"sequences": [_OK_SEQ]})
    assert r.status_code == 200
    assert 'opd_rejected_total{reason="capacity",service="teacher"} 1.0' in httpx.get(
        srv.base_url + "/metrics").text
