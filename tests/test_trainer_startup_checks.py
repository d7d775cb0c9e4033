"""The trainer's start-up checks on the two services' /info (no servers needed)."""

from __future__ import annotations

import pytest

from services.protocol import InfoResponse
from trainer.config import load_config
from trainer.errors import StartupError
from trainer.service_checks import check_services

PARTS = {"vocab": "v", "model": "m", "added_tokens": "a", "special_tokens": "s", "chat_template": "c"}


def _info(service: str, fingerprint: str = "f" * 64, **extra) -> InfoResponse:
    fields = {
        "service": service,
        "model": f"{service}-model",
        "served_model_name": f"{service}-model",
        "backend": "hf",
        "dtype": "float32",
        "device": "cpu",
        "max_model_len": 2048,
        "vocab_size": 512,
        "tokenizer_fingerprint": fingerprint,
        "eos_token_ids": [0],
        "limits": {},
        "version": "0",
    }
    fields.update(extra)
    return InfoResponse(**fields)


@pytest.fixture
def cfg():
    return load_config(None, ["student.model=student-model", "trainer.max_model_len=1024", "rollout.max_tokens=256",
                                   "eval.max_tokens=256"])


def test_matching_services_pass(cfg) -> None:
    check_services(cfg, _info("teacher"), _info("student_rollout"))


def test_swapped_urls_are_named(cfg) -> None:
    with pytest.raises(StartupError, match="URLs swapped"):
        check_services(cfg, _info("student_rollout"), _info("teacher"))


def test_tokenizer_mismatch_names_the_differing_part(cfg) -> None:
    teacher, rollout = _info("teacher", "a" * 64), _info("student_rollout", "b" * 64)
    with pytest.raises(StartupError, match=r"differing parts: vocab\)"):
        check_services(cfg, teacher, rollout, components=(PARTS, {**PARTS, "vocab": "x"}))
    with pytest.raises(StartupError, match="same tokenizer"):
        check_services(cfg, teacher, rollout)  # no components published: plain refusal


def test_chat_template_only_difference_is_accepted(cfg, caplog) -> None:
    teacher, rollout = _info("teacher", "a" * 64), _info("student_rollout", "b" * 64)
    check_services(cfg, teacher, rollout, components=(PARTS, {**PARTS, "chat_template": "x"}))
    assert "differ only in their chat templates" in caplog.text


def test_trainer_and_rollout_tokenizers_must_agree(cfg) -> None:
    with pytest.raises(StartupError, match="trainer's student tokenizer"):
        check_services(cfg, _info("teacher"), _info("student_rollout"), local_fingerprint="0" * 64)


def test_short_service_context_is_refused(cfg) -> None:
    with pytest.raises(StartupError, match="max_model_len is 512"):
        check_services(cfg, _info("teacher", max_model_len=512), _info("student_rollout"))


def _with(*overrides: str):
    return load_config(None, ["student.model=student-model", *overrides])


def test_top_k_above_the_teachers_limit_is_refused_at_start() -> None:
    """A top-k the teacher would refuse fails before the first step samples anything."""
    teacher = _info("teacher", limits={"max_top_k": 20})
    with pytest.raises(StartupError, match=r"algorithm.teacher_top_k is 32 .* at most 20") as e:
        check_services(_with("algorithm.teacher_top_k=32"), teacher, _info("student_rollout"))
    assert "--max-top-k 32" in str(e.value)
    check_services(_with("algorithm.teacher_top_k=20"), teacher, _info("student_rollout"))


def test_samples_per_prompt_above_the_rollout_limit_is_refused() -> None:
    rollout = _info("student_rollout", limits={"max_n": 4})
    with pytest.raises(StartupError, match="rollout.samples_per_prompt is 8") as e:
        check_services(_with("rollout.samples_per_prompt=8"), _info("teacher"), rollout)
    assert "--max-n 8" in str(e.value)
    kl = ["rollout.samples_per_prompt=4", "eval.kl_samples_per_prompt=6"]
    with pytest.raises(StartupError, match="eval.kl_samples_per_prompt is 6"):
        check_services(_with(*kl, "eval.kl_prompts=8"), _info("teacher"), rollout)
    # the KL measurement off: its n is never asked for
    check_services(_with(*kl, "eval.kl_prompts=0"), _info("teacher"), rollout)


def test_a_service_without_published_limits_passes() -> None:
    cfg = _with("algorithm.teacher_top_k=64", "rollout.samples_per_prompt=128")
    check_services(cfg, _info("teacher", limits={}), _info("student_rollout", limits={}))
