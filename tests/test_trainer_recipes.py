"""Whole runs of the recipe options on the tiny models (real services, hf backend): a teacher
context with the teacher's top-k in the loss, weights sent by broadcast, and a broadcast that
fails falling back to the disk path."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.servers import start_server
from tests.trainer_runs import _config, _rollout_args
from trainer.cli import train_main
from trainer.observability import read_metrics


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    """A teacher (tiny teacher, top-k up to 8) and a rollout service (tiny student)."""
    weights_dir = tmp_path_factory.mktemp("recipe_weights")
    teacher = start_server(
        "services.teacher",
        [
            "--model",
            str(tiny_models["teacher"]),
            "--backend",
            "hf",
            "--device",
            "cpu",
            "--max-top-k",
            "8",
        ],
        wait=False,
    )
    rollout = start_server(
        "services.student_rollout", _rollout_args(tiny_models["student"], weights_dir), wait=False
    )
    try:
        yield {"teacher": teacher.wait_ready(240), "rollout": rollout.wait_ready(240)}
    finally:
        teacher.stop()
        rollout.stop()


def _run(tmp_path, pair, tiny_models, gsm8k_dir, name: str, **sections) -> list[dict]:
    base = {
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_tokens": 16},
        "trainer": {"total_steps": 2},
        "eval": {
            "at_start": False,
            "at_end": True,
            "limit": 4,
            "kl_prompts": 2,
            "kl_samples_per_prompt": 1,
        },
        "teacher": {"context": {"system": "You are a teacher.", "few_shot": 1}},
        "algorithm": {"teacher_top_k": 4, "top_k_beta": 0.5},
    }
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    cfg = _config(tmp_path, pair, tiny_models, gsm8k_dir, name, **base)
    assert train_main([str(cfg)]) == 0
    return read_metrics(tmp_path / name)


def _served(pair) -> dict:
    return httpx.get(pair["rollout"].base_url + "/v1/weights", timeout=10).json()


def test_context_top_k_and_broadcast_run_to_the_end(tmp_path, pair, tiny_models, gsm8k_dir):
    records = _run(
        tmp_path,
        pair,
        tiny_models,
        gsm8k_dir,
        "broadcast",
        sync={"method": "broadcast", "broadcast_addr": "127.0.0.1", "broadcast_timeout_s": 60},
    )
    steps = [r for r in records if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["actor/top_k_divergence"] > 0
        assert 0 < r["rollout/teacher_tail_mass"] < 1
    assert "eval/reverse_kl" in records[-1]
    status = _served(pair)
    # Version 1 went by disk at start; the two steps' versions by broadcast.
    assert status["source"] == "broadcast"
    assert status["policy_version"] == steps[-1]["policy/version"] + 1


def test_failed_broadcast_falls_back_to_the_disk_path(tmp_path, pair, tiny_models, gsm8k_dir):
    # The store's port is taken: every broadcast fails at set-up, the disk path sends instead.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        records = _run(
            tmp_path,
            pair,
            tiny_models,
            gsm8k_dir,
            "fallback",
            sync={
                "method": "broadcast",
                "broadcast_addr": "127.0.0.1",
                "broadcast_port": taken.getsockname()[1],
                "broadcast_timeout_s": 5,
            },
        )
    assert [r["step"] for r in records if "actor/pg_loss" in r] == [1, 2]
    status = _served(pair)
    assert status["source"] != "broadcast" and status["policy_version"] >= 3
