"""Shared fixtures: tiny teacher/student models built once per test session.

On a host without CUDA the Triton kernels run through Triton's interpreter. Triton reads
``TRITON_INTERPRET`` when ``triton`` is first imported and when a kernel is decorated, so this
file, which pytest imports before any test module, imports triton and the kernel modules with
the variable set, then puts it back so it does not leak into the services tests start.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _import_kernels_for_the_interpreter() -> None:
    if torch.cuda.is_available():
        return  # kernels are compiled and tested on CUDA tensors
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        import trainer.kernels.linear_logprob_triton  # noqa: F401
        import trainer.kernels.opd_loss_triton  # noqa: F401
        import trainer.kernels.topk_divergence_triton  # noqa: F401
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


_import_kernels_for_the_interpreter()


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
    """The GSM8K subset shipped with the package (trainer/gsm8k_subset/): always there."""
    from trainer.data import BUNDLED_DIR

    return BUNDLED_DIR
