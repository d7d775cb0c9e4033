"""The teacher's own prompt: context the student does not see (``teacher.context``).

Both models score exactly the student's completion tokens; only what comes before them
differs. For a problem ``x`` and the student's completion ``y``, the student is trained on
``log pi_student(y | prompt(x))`` and the teacher scores ``log pi_teacher(y | context(x))``
with ``context(x)`` the chat below, tokenized with the same tokenizer (the services'
tokenizer fingerprint check guarantees the ids mean the same tokens):

* ``system`` -- the teacher's system prompt replaces the student's;
* ``few_shot: K`` -- the first ``K`` problems of the train split as prior user/assistant
  turns, each answered by its reference solution rewritten into the prompt's answer format
  (:func:`format_solution`). They are taken out of the training prompts, so the student is
  never trained on a problem whose answer the teacher was shown;
* ``reference_solution`` -- the problem's own reference solution, rewritten the same way,
  follows the question in the teacher's user turn (privileged information).

With every option off the teacher sees the student's prompt and :class:`TeacherContext` hands
back the rollout's own prompt ids (nothing is re-tokenized).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from trainer.config_sections import TeacherContextConfig
from trainer.data import SYSTEM_PROMPT, USER_TEMPLATE, Example

__all__ = ["TeacherContext", "format_solution", "split_few_shot"]

_CALCULATOR = re.compile(r"<<[^<>]*>>")
#: The user turn's addition under ``reference_solution``.
REFERENCE_TEMPLATE = "{user}\n\nA correct reference solution (shown to you only):\n{solution}"


def format_solution(answer: str) -> str:
    """A GSM8K reference solution in the prompt's answer format.

    The calculator annotations (``<<48/2=24>>``) are dropped and the final ``#### 72`` line
    becomes ``The final answer is \\boxed{72}.``, the form the prompt asks for.
    """
    body, _, final = answer.rpartition("####")
    if not _:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-200:]!r}")
    steps = _CALCULATOR.sub("", body).strip()
    value = final.strip().replace(",", "")
    return f"{steps}\nThe final answer is \\boxed{{{value}}}."


def split_few_shot(train: Sequence[Example], k: int) -> tuple[list[Example], list[Example]]:
    """``(shots, rest)``: the first ``k`` train problems, and the others (the training prompts)."""
    if k > len(train):
        raise ValueError(
            f"teacher.context.few_shot is {k} but the train split has only {len(train)} problems"
        )
    return list(train[:k]), list(train[k:])


class TeacherContext:
    """Builds the teacher's prompt (messages and token ids) for a problem."""

    def __init__(
        self, cfg: TeacherContextConfig, shots: Sequence[Example], tokenizer: Any = None
    ) -> None:
        """``shots``: the few-shot problems (``len(shots) == cfg.few_shot``); ``tokenizer``:
        the student's (needed only when the context is active)."""
        if len(shots) != cfg.few_shot:
            raise ValueError(
                f"{len(shots)} few-shot problems given, config asks for {cfg.few_shot}"
            )
        if cfg.active and tokenizer is None:
            raise ValueError("a teacher context needs the tokenizer to build the teacher's ids")
        self.cfg = cfg
        self.shots = list(shots)
        self.tokenizer = tokenizer
        self._prefix = self._shot_turns()
        # Keyed by what the prompt is made of, not by ``Example.index``: that is a position in
        # its split, and a train and a test problem share it (the held-out evaluation once got
        # the teacher prompts of the train problems with the same index).
        self._cache: dict[tuple[str, str], list[int]] = {}
        # Batches are scored on several threads, and a fast tokenizer used by two at once
        # can fail ("Already borrowed"): one tokenization at a time.
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether the teacher's prompt differs from the student's."""
        return self.cfg.active

    def _shot_turns(self) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.cfg.system or SYSTEM_PROMPT}]
        for shot in self.shots:
            turns.append({"role": "user", "content": USER_TEMPLATE.format(question=shot.question)})
            turns.append({"role": "assistant", "content": format_solution(shot.answer)})
        return turns

    def messages(self, example: Example) -> list[dict[str, str]]:
        """The teacher's chat for ``example``, ending with its user turn."""
        user = USER_TEMPLATE.format(question=example.question)
        if self.cfg.reference_solution:
            user = REFERENCE_TEMPLATE.format(user=user, solution=format_solution(example.answer))
        return [*self._prefix, {"role": "user", "content": user}]

    def prompt_ids(self, example: Example, student_prompt_ids: Sequence[int]) -> list[int]:
        """The teacher's prompt token ids for ``example`` (chat template with the generation
        prompt); the student's own ids when the context is inactive."""
        if not self.active:
            return [int(t) for t in student_prompt_ids]
        key = (example.question, example.answer if self.cfg.reference_solution else "")
        with self._lock:
            if key not in self._cache:
                self._cache[key] = chat_ids(self.tokenizer, self.messages(example))
            return self._cache[key]

    def context_tokens(self) -> int:
        """Tokens of the shared part (system prompt and few-shot turns), for the budget check."""
        if not self.active:
            return 0
        return len(chat_ids(self.tokenizer, self._prefix, generation_prompt=False))


def chat_ids(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]
