"""The rollout server a `RolloutContract` class runs its checks on, and the checks' helpers.

One server per concrete test class (class-scoped fixtures), whichever mixins the class
combines, so every check of a backend runs on the same server.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file

from services.protocol import decode_array
from tests.backends import HFServer
from tests.rollout_reference import API_KEY, AUTH, Reference, save_dir
from tests.servers import ServerHandle, start_server

MAX_N = 8
MAX_UPLOAD = 4 * 1024 * 1024  # the tiny student is ~1.7 MB


class RolloutServer(HFServer):
    """The server and the helpers of the checks; a backend mixin (tests/backends.py) sets the
    server and the tolerance."""

    # ----------------------------------------------------------------- fixtures

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, tiny_models, tmp_path_factory) -> dict[str, Any]:
        root = tmp_path_factory.mktemp("rollout")
        weights = root / "weights"
        weights.mkdir()
        outside = root / "outside"
        save_dir(outside, load_file(str(tiny_models["student"] / "model.safetensors")))
        os.symlink(outside, weights / "escape")
        server = start_server(
            "services.student_rollout",
            [
                "--model",
                str(tiny_models["student"]),
                "--dtype",
                "float32",
                "--weights-dir",
                str(weights),
                "--max-n",
                str(MAX_N),
                "--max-upload-bytes",
                str(MAX_UPLOAD),
                *cls.BACKEND_ARGS,
            ],
            env={**cls.SERVER_ENV, "OPD_API_KEY": API_KEY},
            ready_timeout=cls.READY_TIMEOUT,
        )
        ref = Reference(tiny_models["student"])
        try:
            yield {
                "server": server,
                "weights": weights,
                "outside": outside,
                "root": root,
                "ref": ref,
                "eos": ref.tokenizer.eos_token_id,
            }
        finally:
            server.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def client(cls, env) -> httpx.Client:
        server: ServerHandle = env["server"]
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120.0) as c:
            yield c

    # ----------------------------------------------------------------- helpers

    def rollouts(self, client: httpx.Client, **body: Any) -> dict[str, Any]:
        r = client.post("/v1/rollouts", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def check_items(
        self, env, data: dict[str, Any], prompts: list[list[int]] | None, temperature: float
    ) -> None:
        """Every item's logprobs equal the reference forward of its reported version."""
        ref: Reference = env["ref"]
        for item in data["data"]:
            prompt = decode_array(item["prompt_token_ids"]).tolist()
            if prompts is not None:
                assert prompt == prompts[item["prompt_index"]]
            tokens = decode_array(item["token_ids"]).tolist()
            got = decode_array(item["logprobs"]).astype(np.float64)
            assert len(tokens) == len(got) >= 1
            want, argmax = ref.logprobs(item["policy_version"], prompt, tokens, temperature)
            np.testing.assert_allclose(got, want, atol=self.ATOL, rtol=0)
            if temperature == 0:
                assert tokens == argmax.tolist()

    def greedy(self, client: httpx.Client) -> dict[str, Any]:
        return self.rollouts(
            client, prompts=[{"prompt": "Tom has 12 apples"}], n=1, max_tokens=12, temperature=0.0
        )

    def assert_unchanged(self, env, client, before: dict[str, Any]) -> None:
        """The old weights keep answering: same greedy output, same version."""
        after = self.greedy(client)
        assert after["policy_version"] == before["policy_version"]
        a, b = after["data"][0], before["data"][0]
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=self.ATOL, rtol=0)
        self.check_items(env, after, None, 0.0)
        status = client.get("/v1/weights").json()
        assert status["policy_version"] == before["policy_version"]

    def push(self, env, client, method: str, version: int, tensors: dict) -> dict[str, Any]:
        name = f"v{version}-{method}"
        directory = save_dir(env["weights"] / name, tensors)
        if method == "load":
            r = client.post("/v1/weights/load", json={"path": name, "version": version})
        else:
            r = client.put(
                f"/v1/weights?version={version}",
                content=(directory / "model.safetensors").read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
        assert r.status_code == 200, r.text
        env["ref"].versions[version] = tensors
        return r.json()

    def error(self, response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
        assert response.status_code == status, response.text
        err = response.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}
        for needle in needles:
            assert needle in err["message"] or needle == err["param"], (needle, err)
        return err
