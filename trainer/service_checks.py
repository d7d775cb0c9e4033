"""Start-up checks: refuse a teacher and a rollout service that cannot be used together.

OPD compares the teacher's and the student's logprobs of the same token ids, so both services
must use one tokenizer (and the trainer's own student tokenizer must be the rollout
service's); the URLs must not be swapped; the teacher must serve the configured model; and
both must accept sequences of ``trainer.max_model_len`` tokens (docs/trainer.md, "Start-up
checks").
"""

from __future__ import annotations

import logging

from services.protocol import InfoResponse
from trainer.config import TrainConfig
from trainer.errors import StartupError

__all__ = ["check_services"]

log = logging.getLogger("opd.trainer")


def _same_model(expected: str, info: InfoResponse) -> bool:
    """Whether ``info`` serves ``expected`` (a local path matches a hub id by its last part)."""
    names = {info.model, info.served_model_name}
    tail = expected.rstrip("/").rsplit("/", 1)[-1]
    return expected in names or any(n.rstrip("/").rsplit("/", 1)[-1] == tail for n in names)


def _check_limits(cfg: TrainConfig, teacher: InfoResponse, rollout: InfoResponse) -> None:
    """Refuse a run whose requests a service's published limits (``/info`` ``limits``) would
    refuse, before the first step samples anything. A service that publishes no limit passes."""
    wanted = [
        (teacher, "max_top_k", "algorithm.teacher_top_k", cfg.algorithm.teacher_top_k),
        (rollout, "max_n", "rollout.samples_per_prompt", cfg.rollout.samples_per_prompt),
    ]
    if cfg.eval.kl_prompts:
        n = cfg.eval.kl_samples_per_prompt
        wanted.append((rollout, "max_n", "eval.kl_samples_per_prompt", n))
    for info, limit, key, value in wanted:
        allowed = info.limits.get(limit)
        if allowed is not None and value > allowed:
            flag = "--" + limit.replace("_", "-")  # the service flag that sets the limit
            raise StartupError(
                f"{key} is {value} but the {info.service} service allows at most {allowed} "
                f"({limit} in its /info). Start it with {flag} {value} or lower {key}"
            )


def check_services(
    cfg: TrainConfig,
    teacher: InfoResponse,
    rollout: InfoResponse,
    local_fingerprint: str | None = None,
    components: tuple[dict[str, str], dict[str, str]] | None = None,
) -> None:
    """Refuse to start when the two services cannot be used together (raises StartupError).

    ``components``: per-part tokenizer fingerprints of (teacher, rollout) when the services
    publish them (``tokenizer_fingerprint_components`` in /info). Then a difference in the
    chat template alone is accepted with a warning: the trainer sends the teacher token ids
    (rendered by the student's template), so the teacher's own template is never used.
    """
    if teacher.service != "teacher" or rollout.service != "student_rollout":
        raise StartupError(
            f"services.teacher_url answers as {teacher.service!r} and services.rollout_url as "
            f"{rollout.service!r}; expected 'teacher' and 'student_rollout' (URLs swapped?)"
        )
    if teacher.tokenizer_fingerprint != rollout.tokenizer_fingerprint:
        differing = None
        if components is not None:
            from services.engine import fingerprint_mismatch

            differing = fingerprint_mismatch(*components)
        if differing == ["chat_template"]:
            log.warning(
                "teacher and student tokenizers differ only in their chat templates; fine for "
                "OPD (the teacher scores token ids rendered with the student's template)"
            )
        else:
            parts = f" (differing parts: {', '.join(differing)})" if differing else ""
            raise StartupError(
                "tokenizer mismatch: the teacher serves "
                f"{teacher.model!r} (tokenizer fingerprint {teacher.tokenizer_fingerprint[:16]}...) "
                f"and the student rollout serves {rollout.model!r} (fingerprint "
                f"{rollout.tokenizer_fingerprint[:16]}...){parts}. On-policy distillation "
                "compares the teacher's and the student's logprobs of the same token ids, so "
                "both models must use the same tokenizer (vocabulary, merges, special tokens)."
            )
    if local_fingerprint is not None and local_fingerprint != rollout.tokenizer_fingerprint:
        raise StartupError(
            "tokenizer mismatch: the trainer's student tokenizer "
            f"({cfg.student.tokenizer or cfg.student.model}, fingerprint {local_fingerprint[:16]}...) "
            f"differs from the rollout service's ({rollout.model!r}, "
            f"{rollout.tokenizer_fingerprint[:16]}...); the trainer must compute logprobs of "
            "exactly the token ids the rollout service samples."
        )
    if cfg.teacher.model and not _same_model(cfg.teacher.model, teacher):
        raise StartupError(
            f"teacher.model is {cfg.teacher.model!r} but the teacher service serves "
            f"{teacher.model!r} (served as {teacher.served_model_name!r}); point "
            "services.teacher_url at the right service, or set teacher.model to null to skip "
            "this check"
        )
    _check_limits(cfg, teacher, rollout)
    for name, info in (("teacher", teacher), ("rollout", rollout)):
        if info.max_model_len < cfg.trainer.max_model_len:
            raise StartupError(
                f"the {name} service's max_model_len is {info.max_model_len}, below "
                f"trainer.max_model_len {cfg.trainer.max_model_len}: long samples would be "
                f"refused. Start it with --max-model-len {cfg.trainer.max_model_len} or lower "
                "trainer.max_model_len"
            )
