"""Shared fixtures: tiny teacher/student models built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer and two different random Llama models sharing it: teacher != student."""
    from opd.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    build_tokenizer(root / "tokenizer")
    teacher = build_model(root / "teacher", root / "tokenizer", seed=1)
    student = build_model(root / "student", root / "tokenizer", seed=2)
    return {"tokenizer": root / "tokenizer", "teacher": teacher, "student": student}


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The GSM8K copy beside the repo (../shared/data/gsm8k); skip where it is absent."""
    path = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
    if not (path / "train.jsonl").exists():
        pytest.skip(f"GSM8K copy not found at {path}")
    return path
