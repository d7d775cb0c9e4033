"""The rollout contract's checks of requests that are not plain `/v1/rollouts` bodies:
malformed ones (a named 4xx each) and the OpenAI-compatible routes.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.rollout_reference import API_KEY
from tests.rollout_server import MAX_N, RolloutServer


class RequestChecks(RolloutServer):
    """Validation errors, then the official openai client on the chat and completions routes."""

    def test_validation_errors(self, env, client):
        def post(**body: Any) -> httpx.Response:
            return client.post("/v1/rollouts", json=body)

        base = {"max_tokens": 4}
        self.error(
            post(prompts=[{"prompt": "a"}, {"token_ids": [1, 2, 512]}], **base),
            400,
            "prompts[1].token_ids[2]",
            "512",
        )
        self.error(
            post(prompts=[{"token_ids": [1, 2, -1]}], **base), 400, "prompts[0].token_ids[2]"
        )
        self.error(
            post(prompts=[{"token_ids": [1] * 1000}], max_tokens=100),
            400,
            "prompts[0]",
            "max_model_len",
            "1100",
        )
        self.error(post(prompts=[{"prompt": "a"}], n=MAX_N + 1, **base), 400, "n", "max_n")
        self.error(post(prompts=[], **base), 400, "prompts")
        self.error(post(prompts=[{"prompt": ""}], **base), 400, "prompts[0].prompt")
        self.error(post(prompts=[{"token_ids": []}], **base), 400, "prompts[0].token_ids")
        self.error(post(prompts=[{"messages": []}], **base), 400, "prompts[0].messages")
        self.error(post(prompts=[{"prompt": "a", "token_ids": [1]}], **base), 400, "prompts[0]")
        self.error(post(prompts=[{"prompt": "a"}], max_tokens=0), 400, "max_tokens")
        self.error(post(prompts=[{"prompt": "a"}], temprature=1.0, **base), 400, "temprature")
        self.error(post(prompts=[{"prompt": "a"}], stop=[""], **base), 400, "stop")
        self.error(post(prompts=[{"prompt": "a"}], top_k=100000, **base), 400, "top_k")
        self.error(post(prompts=[{"prompt": "a"}], model="other", **base), 404, "model")
        r = client.post(
            "/v1/rollouts", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        self.error(r, 400, "JSON")
        r = httpx.post(str(client.base_url) + "/v1/rollouts", json={"prompts": [{"prompt": "a"}]})
        self.error(r, 401)

    def test_openai_client_chat(self, env, client):
        from openai import OpenAI

        oai = OpenAI(base_url=str(client.base_url) + "/v1", api_key=API_KEY)
        model = oai.models.list().data[0].id
        out = oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Lee has 2 hours"}],
            max_tokens=6,
            temperature=0.0,
            logprobs=True,
            top_logprobs=2,
        )
        choice = out.choices[0]
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert len(choice.logprobs.content) == out.usage.completion_tokens
        comp = oai.completions.create(
            model=model, prompt="Ravi has", max_tokens=5, temperature=0.0, logprobs=1
        )
        assert comp.choices[0].logprobs is not None
