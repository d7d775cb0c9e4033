"""`sync.method: broadcast` on CPU: this process (the trainer, rank 0) sends weights over gloo
to rollout replicas running as real uvicorn processes: two hf replicas here, one vllm replica
in tests/test_broadcast_sync_vllm.py (with the helpers of this module).

Checked on both backends: the replicas serve the broadcast version and their greedy
rollouts' logprobs equal a float32 transformers forward of exactly those weights; a manifest
with a wrong shape, an unknown or a missing name is refused with a 400 naming it while the old
weights keep serving; a broadcast cut off after its first bucket leaves the old version
serving, and the replicas recover (the next broadcast and a disk load both work). On vllm
also: a load that fails inside the engine after every check passed (tests/weight_faults.py),
from disk or from a broadcast, puts back the weights that were serving, whether they came by
broadcast (kept in vLLM's worker) or from a directory; and one group feeds an hf and a vllm
replica at once. The worker side's own checks are tested in process in
tests/test_vllm_weight_transfer.py. Each backend's tests run in order on its servers
(versions only grow).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from services.protocol import BroadcastRequest, decode_array
from services.student_rollout.broadcast_group import pack, unpack
from tests.rollout_reference import API_KEY, AUTH, Reference, perturbed, save_dir
from tests.servers import ServerHandle, start_server
from trainer.broadcast_sync import BroadcastError, BroadcastSender
from trainer.clients import RolloutClient
from trainer.retry import RetryPolicy

BUCKET_BYTES = 256 * 1024  # the tiny student is ~1.7 MB: several buckets
PROMPT = [{"prompt": "Tom has 12 apples"}]


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("broadcast")
    handles: list[ServerHandle] = []
    weights: list[Path] = []
    try:
        for i in range(2):
            weights.append(root / f"weights-{i}")
            weights[-1].mkdir()
            args = [
                "--model",
                str(tiny_models["student"]),
                "--backend",
                "hf",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--weights-dir",
                str(weights[-1]),
            ]
            handles.append(
                start_server(
                    "services.student_rollout", args, env={"OPD_API_KEY": API_KEY}, wait=False
                )
            )
        for handle in handles:  # loading in parallel
            handle.wait_ready(180.0)
        retry = RetryPolicy(max_attempts=2, deadline_s=5.0)
        clients = [
            RolloutClient("rollout", h.base_url, api_key=API_KEY, timeout_s=60.0, retry=retry)
            for h in handles
        ]
        yield {
            "handles": handles,
            "weights": weights,
            "clients": clients,
            "ref": Reference(tiny_models["student"]),
        }
        for client in clients:
            client.close()
    finally:
        for handle in handles:
            handle.stop()


def send_misshapen(env, seed: int) -> None:
    """Broadcast version 3 with the second tensor of the wrong shape: the sender's push fails
    with the replicas' 400, which names that tensor."""
    name = list(env["ref"].initial)[1]
    bad = dict(perturbed(env["ref"].initial, seed=seed))
    bad[name] = torch.zeros(3, 3)
    with pytest.raises(BroadcastError, match="shape") as caught:
        sender(env).send(bad, 3)
    assert caught.value.status == 400 and name in str(caught.value)


def sender(env, cls: type[BroadcastSender] = BroadcastSender) -> BroadcastSender:
    return cls(
        env["clients"],
        master_addr="127.0.0.1",
        master_port=None,
        backend="gloo",
        bucket_bytes=BUCKET_BYTES,
        timeout_s=30.0,
    )


def get(handle: ServerHandle, path: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(handle.base_url + path, headers=AUTH, params=params, timeout=60.0)
    assert r.status_code == 200, r.text
    return r.json()


def greedy(env, handle: ServerHandle) -> dict[str, Any]:
    """One greedy rollout, checked against the reference forward of the version it reports."""
    r = httpx.post(
        handle.base_url + "/v1/rollouts",
        headers=AUTH,
        timeout=60.0,
        json={"prompts": PROMPT, "max_tokens": 8, "temperature": 0.0},
    )
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    prompt = decode_array(item["prompt_token_ids"]).tolist()
    tokens = decode_array(item["token_ids"]).tolist()
    want, argmax = env["ref"].logprobs(item["policy_version"], prompt, tokens, 0.0)
    np.testing.assert_allclose(item["logprobs"], want, atol=env.get("atol", 1e-4), rtol=0)
    assert tokens == argmax.tolist()
    return item


def assert_serving(env, version: int, source: str | None = None) -> list[dict[str, Any]]:
    items = []
    for handle in env["handles"]:
        status = get(handle, "/v1/weights")
        assert status["policy_version"] == version, status
        if source is not None:
            assert status["source"] == source
        items.append(greedy(env, handle))
        assert items[-1]["policy_version"] == version
    return items


def error(response: httpx.Response, status: int, param: str, *needles: str) -> None:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["param"] == param, err
    for needle in needles:
        assert needle in err["message"], (needle, err)


# --------------------------------------------------------------------------- tests (in order)


def test_broadcast_serves_new_weights_on_every_replica(env):
    initial = env["ref"].initial
    before = assert_serving(env, 0, "initial")
    s = sender(env)
    try:
        for version, seed in ((1, 11), (2, 12)):  # the second reuses the group
            new = perturbed(initial, seed=seed)
            env["ref"].versions[version] = new
            s.send(new, version)
            after = assert_serving(env, version, "broadcast")
            for a, b in zip(after, before, strict=True):
                assert not np.allclose(a["logprobs"], b["logprobs"], atol=1e-3)
            group = get(env["handles"][0], "/v1/weights/broadcast")
            assert group["state"] == "ready" and group["result"] == "ok", group
            assert group["version"] == version and group["buckets"] >= 4, group
    finally:
        s.close()
    for handle in env["handles"]:
        assert get(handle, "/v1/weights/broadcast")["state"] == "idle"


def test_bad_manifest_is_refused_naming_it(env):
    before = assert_serving(env, 2)
    handle = env["handles"][0]
    names = list(env["ref"].initial)
    manifest = [
        {"name": n, "shape": list(t.shape), "dtype": "float32"}
        for n, t in env["ref"].initial.items()
    ]

    def post(tensors: list[dict[str, Any]], **extra: Any) -> httpx.Response:
        body = {
            "version": 3,
            "group_name": "g",
            "tensors": tensors,
            "bucket_bytes": 1 << 20,
            **extra,
        }
        return httpx.post(
            handle.base_url + "/v1/weights/broadcast", json=body, headers=AUTH, timeout=30.0
        )

    wrong_shape = [dict(t) for t in manifest]
    wrong_shape[1]["shape"] = [3, 3]
    error(post(wrong_shape), 400, "tensors.1.shape", names[1], "(3, 3)")
    unknown = [*manifest, {"name": "model.extra.weight", "shape": [2], "dtype": "float32"}]
    error(post(unknown), 400, f"tensors.{len(manifest)}.name", "model.extra.weight")
    error(post(manifest[:-1]), 400, "tensors", "missing", names[-1])
    error(post([{**manifest[0], "dtype": "bfloat16"}, *manifest[1:]]), 400, "tensors.0.dtype")
    error(post(manifest, bucket_bytes=0), 400, "bucket_bytes")
    error(post(manifest), 409, "group_name", "not joined")  # valid, but no group here
    error(post(manifest, version=2), 409, "version")
    init = {
        "master_addr": "127.0.0.1",
        "master_port": 1,
        "rank": 2,
        "world_size": 2,
        "group_name": "g",
    }
    r = httpx.post(handle.base_url + "/v1/weights/broadcast/init", json=init, headers=AUTH)
    error(r, 400, "rank", "world_size")
    assert httpx.post(handle.base_url + "/v1/weights/broadcast/init", json=init).status_code == 401

    # Through the sender: refused before a byte is sent, the group torn down, nothing changed.
    send_misshapen(env, seed=13)
    for handle, old in zip(env["handles"], before, strict=True):
        assert get(handle, "/v1/weights/broadcast")["state"] == "idle"
        assert greedy(env, handle)["logprobs"] == old["logprobs"]
    assert_serving(env, 2)


class DiesAfterFirstBucket(BroadcastSender):
    """Sends one bucket, then its end of the group goes away as if the trainer died."""

    seen: list[dict[str, Any]]

    def _broadcast_bucket(self, index: int, flat: torch.Tensor) -> None:
        super()._broadcast_bucket(index, flat)
        if index == 0:
            self._group = None
            gc.collect()  # our end closes: the replicas' next bucket fails at once
            self.seen = [get(h, "/v1/weights/broadcast", wait_s=20.0) for h in self.env["handles"]]
            raise RuntimeError("the trainer died after the first bucket")


def test_interrupted_broadcast_keeps_old_weights_and_recovers(env):
    before = assert_serving(env, 2)
    env["ref"].versions[3] = perturbed(env["ref"].initial, seed=14)
    s = sender(env, DiesAfterFirstBucket)
    s.env = env  # type: ignore[attr-defined]
    with pytest.raises(BroadcastError, match="died after the first bucket"):
        s.send(env["ref"].versions[3], 3)
    for status in s.seen:  # what the replicas said before any teardown
        assert status["state"] == "failed" and status["result"] == "failed", status
        assert "bucket 2 of" in status["error"] and status["policy_version"] == 2, status
        assert status["buckets_received"] == 1
    for handle, old in zip(env["handles"], before, strict=True):
        assert get(handle, "/v1/weights")["policy_version"] == 2
        assert greedy(env, handle)["logprobs"] == old["logprobs"]

    # The next broadcast sets up a fresh group and lands; so does a disk load after it.
    s = sender(env)
    try:
        s.send(env["ref"].versions[3], 3)
    finally:
        s.close()
    assert_serving(env, 3, "broadcast")
    env["ref"].versions[4] = perturbed(env["ref"].initial, seed=15)
    for handle, weights in zip(env["handles"], env["weights"], strict=True):
        save_dir(weights / "v4", env["ref"].versions[4])
        r = httpx.post(
            handle.base_url + "/v1/weights/load",
            headers=AUTH,
            timeout=60.0,
            json={"path": "v4", "version": 4},
        )
        assert r.status_code == 200, r.text
    assert_serving(env, 4)


def test_bucket_plan_round_trips_mixed_dtypes():
    """In process: the layout both sides compute carries every dtype and shape exactly."""
    gen = torch.Generator().manual_seed(0)
    state = {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c": torch.tensor(True),
        "d": torch.zeros(0, 4),
        "e": torch.randint(0, 9, (300,), generator=gen),
        "f": torch.randn(2, 2, generator=gen).t(),  # not contiguous
    }
    manifest = [
        {"name": n, "shape": list(t.shape), "dtype": str(t.dtype)[6:]} for n, t in state.items()
    ]
    req = BroadcastRequest(version=1, group_name="g", tensors=manifest, bucket_bytes=1024)
    plan = req.bucket_plan()
    assert [len(b.tensors) for b in plan] == [4, 1, 1]  # "e" (2400 bytes) goes alone
    staging = [torch.empty(t.shape, dtype=t.dtype) for t in state.values()]
    for bucket in plan:
        wire = torch.empty(bucket.nbytes, dtype=torch.uint8)
        pack(bucket, list(state.values()), wire)
        unpack(bucket, wire, staging)
    for want, got in zip(state.values(), staging, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
