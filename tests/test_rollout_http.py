"""The student rollout service over HTTP, against a real uvicorn subprocess (hf backend).

Every number the service returns is checked against a direct transformers forward of the same
token ids with the weights of the version the service says it used. The tests of
`RolloutContract` run in order on one server per backend (they push weights as they go), so
the vLLM module (tests/test_rollout_vllm.py) runs the very same checks.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.protocol import decode_array
from tests.servers import ServerHandle, start_server

API_KEY = "rollout-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_N = 8
MAX_UPLOAD = 4 * 1024 * 1024  # the tiny student is ~1.7 MB


# --------------------------------------------------------------------------- reference


class Reference:
    """The student in this process, with the weights of any version the service served."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.initial = load_file(str(model_dir / "model.safetensors"))
        self.versions: dict[int, dict[str, torch.Tensor]] = {0: self.initial}
        self._loaded: int | None = None

    def use(self, version: int) -> None:
        if self._loaded != version:
            self.model.load_state_dict(self.versions[version], strict=True)
            self._loaded = version

    @torch.no_grad()
    def logprobs(
        self, version: int, prompt: list[int], completion: list[int], temperature: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(logprob of each completion token at `temperature`, argmax at each position)."""
        self.use(version)
        ids = torch.tensor([prompt + completion])
        logits = self.model(ids).logits[0, len(prompt) - 1 : -1].float()
        t = 1.0 if temperature < 1e-5 else temperature  # greedy reports temperature-1 logprobs
        lp = torch.log_softmax(logits / t, dim=-1)
        picked = lp.gather(1, torch.tensor(completion)[:, None])[:, 0]
        return picked.numpy(), logits.argmax(-1).numpy()


def perturbed(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def eos_heavy(base: dict[str, torch.Tensor], eos: int) -> dict:
    """Weights under which EOS is (numerically) certain at every position.

    A large constant in embedding dim 0 dominates the residual stream, so the final normed
    hidden state is ~ +sqrt(H) e_0; only the EOS row of lm_head reads dim 0.
    """
    sd = {k: v.clone() for k, v in base.items()}
    sd["model.embed_tokens.weight"][:, 0] = 50.0
    sd["lm_head.weight"][:, 0] = 0.0
    sd["lm_head.weight"][eos, 0] = 5.0
    return sd


def save_dir(
    directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata=metadata)
    return directory


# --------------------------------------------------------------------------- contract


class RolloutContract:
    """The checks every backend must pass; subclasses set the server and the tolerance."""

    BACKEND_ARGS: ClassVar[list[str]] = ["--backend", "hf", "--device", "cpu"]
    ATOL: ClassVar[float] = 1e-4
    READY_TIMEOUT: ClassVar[float] = 180.0
    SERVER_ENV: ClassVar[dict[str, str]] = {}

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

    # ----------------------------------------------------------------- tests (in order)

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

    def test_weights_load_by_path(self, env, client):
        before = self.greedy(client)
        status = self.push(env, client, "load", 1, perturbed(env["ref"].initial, seed=1))
        assert status["policy_version"] == 1
        assert status["source"].endswith("v1-load")
        after = self.greedy(client)
        assert after["policy_version"] == 1
        assert after["data"][0]["policy_version"] == 1
        self.check_items(env, after, None, 0.0)
        # The perturbation is large enough that the old weights would not pass the check.
        assert after["data"][0]["logprobs"] != before["data"][0]["logprobs"]
        sampled = self.rollouts(
            client, prompts=[{"prompt": "Tom"}], n=4, max_tokens=8, temperature=0.8
        )
        self.check_items(env, sampled, None, 0.8)
        assert client.get("/info").json()["policy_version"] == 1

    def test_weights_upload(self, env, client):
        status = self.push(env, client, "upload", 2, perturbed(env["ref"].initial, seed=2))
        assert status["policy_version"] == 2 and status["source"] == "upload"
        after = self.greedy(client)
        assert after["policy_version"] == 2
        self.check_items(env, after, None, 0.0)

    def test_eos_stops(self, env, client):
        eos = env["eos"]
        self.push(env, client, "load", 3, eos_heavy(env["ref"].initial, eos))
        for temperature in (0.0, 1.0):
            data = self.rollouts(
                client,
                prompts=[{"prompt": "Tom has"}, {"token_ids": [9, 10]}],
                n=2,
                max_tokens=8,
                temperature=temperature,
            )
            for item in data["data"]:
                assert item["finish_reason"] == "stop"
                assert item["token_ids"] == [eos]  # EOS included in token_ids ...
                assert item["text"] == ""  # ... and not in the text
                assert item["policy_version"] == 3
            self.check_items(env, data, None, temperature)
        # Back to ordinary weights for the remaining tests.
        self.push(env, client, "upload", 4, perturbed(env["ref"].initial, seed=4))

    def test_bad_updates_keep_old_weights(self, env, client):
        before = self.greedy(client)
        version = before["policy_version"]
        good = perturbed(env["ref"].initial, seed=5)
        weights: Path = env["weights"]

        # A truncated file, by path and by upload.
        blob = (save_dir(env["root"] / "good", good) / "model.safetensors").read_bytes()
        (weights / "truncated").mkdir()
        (weights / "truncated" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        r = client.post("/v1/weights/load", json={"path": "truncated", "version": version + 1})
        self.error(r, 400, "truncated", "path")
        r = client.put(f"/v1/weights?version={version + 1}", content=blob[:-100])
        self.error(r, 400, "truncated")
        self.assert_unchanged(env, client, before)

        # Wrong shape, missing tensor, wrong dtype, unknown tensor.
        bad_shape = dict(good)
        bad_shape["lm_head.weight"] = torch.zeros(10, 10)
        save_dir(weights / "bad_shape", bad_shape)
        self.error(
            client.post("/v1/weights/load", json={"path": "bad_shape", "version": version + 1}),
            400,
            "lm_head.weight",
            "shape",
        )
        missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
        save_dir(weights / "missing", missing)
        self.error(
            client.post("/v1/weights/load", json={"path": "missing", "version": version + 1}),
            400,
            "missing",
            "model.norm.weight",
        )
        bf16 = {k: v.to(torch.bfloat16) for k, v in good.items()}
        save_dir(env["root"] / "bf16", bf16)
        r = client.put(
            f"/v1/weights?version={version + 1}",
            content=(env["root"] / "bf16" / "model.safetensors").read_bytes(),
        )
        self.error(r, 400, "dtype")
        save_dir(env["root"] / "extra", {**good, "extra.weight": torch.zeros(2)})
        r = client.put(
            f"/v1/weights?version={version + 1}",
            content=(env["root"] / "extra" / "model.safetensors").read_bytes(),
        )
        self.error(r, 400, "unknown", "extra.weight")
        self.assert_unchanged(env, client, before)

        # Not safetensors at all.
        self.error(
            client.put(f"/v1/weights?version={version + 1}", content=b"hello " * 100),
            400,
            "not a safetensors file",
        )
        self.error(
            client.put(
                f"/v1/weights?version={version + 1}", content=struct.pack("<Q", 5) + b"[1,2]"
            ),
            400,
            "not a safetensors",
        )
        self.error(client.put(f"/v1/weights?version={version + 1}", content=b""), 400, "empty")
        self.assert_unchanged(env, client, before)

        # Old and equal versions: 409, for both methods, before the upload is read.
        save_dir(weights / "good", good)
        for old in (version, version - 1, 0):
            self.error(
                client.post("/v1/weights/load", json={"path": "good", "version": old}),
                409,
                "version",
            )
            self.error(client.put(f"/v1/weights?version={old}", content=blob), 409, "version")

        # Path escapes: `..`, a symlink pointing outside, an absolute path outside.
        self.error(
            client.post("/v1/weights/load", json={"path": "../outside", "version": version + 1}),
            400,
            "path",
            "..",
        )
        self.error(
            client.post("/v1/weights/load", json={"path": "escape", "version": version + 1}),
            403,
            "path",
            "outside",
        )
        self.error(
            client.post(
                "/v1/weights/load", json={"path": str(env["outside"]), "version": version + 1}
            ),
            403,
            "path",
        )
        # A checkpoint directory inside whose file links outside.
        (weights / "linkfile").mkdir()
        os.symlink(env["outside"] / "model.safetensors", weights / "linkfile" / "model.safetensors")
        self.error(
            client.post("/v1/weights/load", json={"path": "linkfile", "version": version + 1}),
            403,
            "path",
        )
        self.error(
            client.post("/v1/weights/load", json={"path": "a\u0000b", "version": version + 1}),
            400,
            "path",
        )
        self.error(
            client.post("/v1/weights/load", json={"path": "nope", "version": version + 1}),
            400,
            "path",
            "does not exist",
        )

        # Over the upload limit: by Content-Length, and while streaming a chunked body.
        self.error(
            client.put(f"/v1/weights?version={version + 1}", content=b"\0" * (MAX_UPLOAD + 1)),
            413,
            "max_upload_bytes",
        )

        def chunks():
            for _ in range(MAX_UPLOAD // 65536 + 2):
                yield b"\0" * 65536

        try:
            r = client.put(f"/v1/weights?version={version + 1}", content=chunks())
            self.error(r, 413, "max_upload_bytes")
        except httpx.TransportError:
            pass  # the server may close the connection before the client finished sending

        # No API key: refused before anything is read.
        r = httpx.post(
            str(client.base_url) + "/v1/weights/load", json={"path": "good", "version": version + 1}
        )
        self.error(r, 401)
        r = httpx.put(str(client.base_url) + f"/v1/weights?version={version + 1}", content=blob)
        self.error(r, 401)
        self.assert_unchanged(env, client, before)

        # And a good update still works afterwards.
        self.push(env, client, "load", version + 1, good)
        self.check_items(env, self.greedy(client), None, 0.0)

    def test_update_during_inflight_rollouts(self, env, client):
        """32 rollouts in flight, an update, 8 more: each trajectory is one version's."""
        server: ServerHandle = env["server"]
        old = client.get("/v1/weights").json()["policy_version"]
        new = old + 1
        tensors = perturbed(env["ref"].initial, seed=100 + new)
        name = f"v{new}-inflight"
        save_dir(env["weights"] / name, tensors)
        env["ref"].versions[new] = tensors

        async def main() -> tuple[list[dict], dict, list[dict]]:
            async with httpx.AsyncClient(
                base_url=server.base_url, headers=AUTH, timeout=120.0
            ) as ac:

                async def rollout(i: int) -> dict:
                    # Unseeded, so the hf engine batches them together; long enough to be
                    # still running when the update arrives.
                    r = await ac.post(
                        "/v1/rollouts",
                        json={
                            "prompts": [{"token_ids": [5 + i, 40, 41 + i]}],
                            "n": 1,
                            "max_tokens": 96,
                            "temperature": 1.0,
                        },
                    )
                    assert r.status_code == 200, r.text
                    return r.json()

                first = [asyncio.create_task(rollout(i)) for i in range(32)]
                await asyncio.sleep(0.3)
                update = asyncio.create_task(
                    ac.post("/v1/weights/load", json={"path": name, "version": new})
                )
                await asyncio.sleep(0.05)
                second = [asyncio.create_task(rollout(100 + i)) for i in range(8)]
                results = await asyncio.gather(*first)
                upd = await update
                assert upd.status_code == 200, upd.text
                return results, upd.json(), await asyncio.gather(*second)

        first, status, second = asyncio.run(main())
        assert status["policy_version"] == new
        seen = set()
        for data in first + second:
            versions = {item["policy_version"] for item in data["data"]}
            assert versions == {data["policy_version"]}
            assert data["policy_version"] in (old, new)
            seen.add(data["policy_version"])
            self.check_items(env, data, None, 1.0)
        # Admitted before the update: they finish on the old weights and say so.
        assert sum(d["policy_version"] == old for d in first) >= 16, [
            d["policy_version"] for d in first
        ]
        after = self.greedy(client)
        assert after["policy_version"] == new
        self.check_items(env, after, None, 0.0)

    def test_metrics(self, client):
        text = client.get("/metrics").text
        assert 'opd_rollouts_total{service="student_rollout"}' in text
        assert (
            'opd_weight_updates_total{method="load",result="ok",service="student_rollout"}' in text
        )
        assert 'result="rejected"' in text
        version = client.get("/v1/weights").json()["policy_version"]
        assert f'opd_policy_version{{service="student_rollout"}} {float(version)}' in text
        assert 'opd_engine_batch_size_count{op="generate",service="student_rollout"}' in text
        assert 'opd_tokens_generated_total{service="student_rollout"}' in text


class TestRolloutHF(RolloutContract):
    """hf backend (float32 on CPU): logprobs equal the reference forward to 1e-4."""
