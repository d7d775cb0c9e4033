"""The rollout contract's first checks: what `/v1/rollouts` samples, against the reference.

Run on the weights the server started with (policy version 0), before any update.
"""

from __future__ import annotations

import httpx
import numpy as np

from services.protocol import decode_array
from tests.rollout_server import RolloutServer


class SamplingChecks(RolloutServer):
    """Info, logprobs equal to the reference forward, base64, seeds, max_tokens and stop."""

    def test_info_and_status(self, client):
        info = client.get("/info").json()
        assert info["service"] == "student_rollout"
        assert info["policy_version"] == 0
        status = client.get("/v1/weights").json()
        assert status["policy_version"] == 0 and status["source"] == "initial"
        assert httpx.get(str(client.base_url) + "/v1/weights").status_code == 401

    def test_logprobs_match_forward(self, env, client):
        tok = env["ref"].tokenizer
        messages = [{"role": "user", "content": "Ana has 3 pens. How many pens?"}]
        chat_ids = tok.encode(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        text_ids = tok.encode("Sam has 7 eggs and buys", add_special_tokens=True)
        raw_ids = [5, 17, 200, 31, 99]
        prompts = [
            {"messages": messages},
            {"prompt": "Sam has 7 eggs and buys"},
            {"token_ids": raw_ids},
        ]
        expected = [chat_ids, text_ids, raw_ids]
        for temperature in (0.0, 0.7, 1.0):
            data = self.rollouts(
                client, prompts=prompts, n=3, max_tokens=10, temperature=temperature, seed=11
            )
            assert data["policy_version"] == 0
            assert len(data["data"]) == 9
            assert [(d["prompt_index"], d["sample_index"]) for d in data["data"]] == [
                (i, j) for i in range(3) for j in range(3)
            ]
            self.check_items(env, data, expected, temperature)
            for item in data["data"]:
                assert item["policy_version"] == 0
                if item["finish_reason"] == "length":
                    assert len(item["token_ids"]) == 10
                if item["prompt_index"] == 2:
                    # Random ids can end the prompt inside a UTF-8 sequence; vLLM's incremental
                    # detokenizer then starts the text with the prompt's dangling bytes. Real
                    # prompts (text, chat) are whole characters: their texts are checked.
                    continue
                # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8
                # sequence (shown as U+FFFD by a one-shot decode); otherwise texts are equal.
                decoded = tok.decode(item["token_ids"], skip_special_tokens=True)
                assert decoded.startswith(item["text"])
                assert set(decoded[len(item["text"]) :]) <= {"\ufffd"}
            usage = data["usage"]
            assert usage["prompt_tokens"] == sum(map(len, expected))
            assert usage["completion_tokens"] == sum(len(d["token_ids"]) for d in data["data"])

    def test_base64_encoding(self, env, client):
        body = {
            "prompts": [{"prompt": "Mia has"}],
            "n": 2,
            "max_tokens": 6,
            "temperature": 1.0,
            "seed": 3,
        }
        plain = self.rollouts(client, **body)
        packed = self.rollouts(client, **body, encoding="base64")
        for a, b in zip(plain["data"], packed["data"], strict=True):
            assert b["logprobs"]["dtype"] == "float32" and b["token_ids"]["dtype"] == "int32"
            assert decode_array(b["token_ids"]).tolist() == a["token_ids"]
            assert decode_array(b["prompt_token_ids"]).tolist() == a["prompt_token_ids"]
            np.testing.assert_allclose(decode_array(b["logprobs"]), a["logprobs"], atol=1e-6)

    def test_seeds_reproduce(self, client):
        body = {
            "prompts": [{"prompt": "Ken has 4"}, {"token_ids": [7, 8, 9]}],
            "n": 4,
            "max_tokens": 12,
            "temperature": 1.0,
            "seed": 1234,
        }
        a, b = self.rollouts(client, **body), self.rollouts(client, **body)
        assert [d["token_ids"] for d in a["data"]] == [d["token_ids"] for d in b["data"]]
        c = self.rollouts(client, **{**body, "seed": 99})
        assert [d["token_ids"] for d in a["data"]] != [d["token_ids"] for d in c["data"]]
        # n samples of one prompt differ from each other.
        assert len({tuple(d["token_ids"]) for d in a["data"][:4]}) > 1

    def test_max_tokens_and_stop(self, client):
        data = self.rollouts(
            client, prompts=[{"prompt": "Olga has 5 books"}], n=1, max_tokens=16, temperature=0.0
        )
        item = data["data"][0]
        assert item["finish_reason"] == "length" and len(item["token_ids"]) == 16
        text = item["text"]
        # Stop on a string the greedy completion is known to produce (not at position 0).
        stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip())
        cut = self.rollouts(
            client,
            prompts=[{"prompt": "Olga has 5 books"}],
            n=1,
            max_tokens=16,
            temperature=0.0,
            stop=[stop],
        )["data"][0]
        assert cut["finish_reason"] == "stop"
        assert cut["text"] == text[: text.index(stop)]
        assert stop not in cut["text"]
        # The tokens up to the one completing the stop string are kept (what was sampled).
        assert cut["token_ids"] == item["token_ids"][: len(cut["token_ids"])]
