"""Small training runs against the test services, shared by tests/test_trainer_e2e.py and the
pool and recipe tests: the rollout service's arguments, the run's config, the trainer's
command line and environment, and reading and comparing the weights a run saved.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.scripts import REPO_ROOT


def _rollout_args(model: Path, weights_dir: Path) -> list[str]:
    return [
        "--model",
        str(model),
        "--backend",
        "hf",
        "--device",
        "cpu",
        "--weights-dir",
        str(weights_dir),
    ]


def _config(tmp_path: Path, svc, tiny_models, gsm8k_dir: Path, name: str, **sections) -> Path:
    """A small run: 8 prompts x 4 samples x 32 tokens per step, Adam at lr 2e-3."""
    cfg = {
        "run_dir": str(tmp_path / name),
        "seed": 7,
        "student": {"model": str(tiny_models["student"])},
        "teacher": {"model": str(tiny_models["teacher"])},
        "rollout": {
            "prompts_per_step": 8,
            "samples_per_prompt": 4,
            "max_tokens": 32,
            "prompts_per_request": 4,
        },
        "trainer": {
            "lr": 2e-3,
            "max_model_len": 1024,
            "micro_batch_tokens": 4096,
            "total_steps": 8,
        },
        "data": {"source": str(gsm8k_dir), "train_limit": 96},
        "eval": {
            "limit": 8,
            "max_tokens": 24,
            "prompts_per_request": 8,
            "kl_prompts": 8,
            "kl_samples_per_prompt": 4,
        },
        "checkpoint": {"interval": 0, "at_end": True},
        "logging": {"metrics_port": 0, "progress_bar": False, "level": "WARNING"},
        "services": {
            "teacher_url": svc["teacher"].base_url,
            "rollout_url": svc["rollout"].base_url,
            "ready_timeout_s": 60,
            "retry_timeout_s": 120,
            "backoff_max_s": 2,
            # retry_timeout_s bounds the retries, not the count: a restarted rollout service
            # on a busy 2-core host can load for longer than 30 attempts x 2 s.
            "max_attempts": 100,
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / "model" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def _trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _small(tmp_path, svc, tiny_models, gsm8k_dir, name: str, **extra: dict) -> Path:
    """4 prompts x 2 samples x 16 tokens, a checkpoint every step, no evaluation."""
    sections: dict[str, dict] = {
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_tokens": 16},
        "trainer": {"total_steps": 6},
        "eval": {"at_start": False, "at_end": False, "kl_prompts": 0},
        "checkpoint": {"interval": 1, "keep_last": 10},
        # One request at a time: the hf engine then batches identically in every run.
        "services": {"max_concurrency": 1},
    }
    for key, values in extra.items():
        sections.setdefault(key, {}).update(values)
    return _config(tmp_path, svc, tiny_models, gsm8k_dir, name, **sections)
