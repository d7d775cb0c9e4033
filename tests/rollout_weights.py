"""The rollout contract's weight updates: by path and by upload, bad updates refused with the
old weights still serving, and an update while rollouts are in flight.

Each check pushes the next policy version; `RolloutContract` runs them in this order, after
the checks on the initial weights.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import httpx
import torch

from tests.rollout_reference import AUTH, eos_heavy, perturbed, save_dir
from tests.rollout_server import MAX_UPLOAD, RolloutServer
from tests.servers import ServerHandle


class WeightsChecks(RolloutServer):
    """Load by path, upload, EOS, refusals that keep the old weights, in-flight updates."""

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
