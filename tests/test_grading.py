"""Final-answer extraction and numeric equivalence for GSM8K (trainer/grading.py)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from trainer import grading
from trainer.data import extract_ground_truth, load_gsm8k
from trainer.grading import (
    Grade,
    _signal_timeout,
    extract_answer,
    extract_answer_with_form,
    grade,
    is_degenerate,
    is_equivalent,
    normalize_number,
)

# (response, ground truth, correct, has_answer)
GRADE_CASES: list[tuple[str, str, bool, bool]] = [
    # boxed forms
    (r"So the result is \boxed{18}.", "18", True, True),
    (r"Half of it: \boxed{\frac{1}{2}}", "0.5", True, True),
    (r"\boxed{\dfrac{1}{2}}", "0.5", True, True),
    (r"\boxed{\tfrac12}", "0.5", True, True),
    (r"\boxed{0.5}", "1/2", True, True),
    (r"\boxed{1/2}", "0.5", True, True),
    (r"In total \boxed{1,000} people.", "1000", True, True),
    (r"\boxed{1,234,567}", "1234567", True, True),
    (r"\boxed{\$18.00}", "18", True, True),
    (r"\boxed{18\%}", "18", True, True),
    (r"\boxed{-3}", "-3", True, True),
    (r"\boxed{\left(-\dfrac{3}{4}\right)}", "-0.75", True, True),
    (r"\boxed{2.5}", "2.5", True, True),
    (r"\boxed{2.50}", "2.5", True, True),
    (r"\boxed{18 \text{ dollars}}", "18", True, True),
    (r"\boxed{5\text{ cm}^2}", "5", True, True),
    (r"\boxed{\text{18}}", "18", True, True),
    (r"\boxed{x = 18}", "18", True, True),
    (r"\boxed {12}", "12", True, True),
    (r"\fbox{12}", "12", True, True),
    (r"\boxed 12.", "12", True, True),
    (r"$\boxed{\$1,234.50}$", "1234.5", True, True),
    (r"\boxed{{18}}", "18", True, True),
    (r"\boxed{3 \times 6}", "18", True, True),  # math-verify evaluates the product
    (r"First \boxed{5}, then corrected: \boxed{7}", "7", True, True),
    (r"First \boxed{7}, then corrected: \boxed{5}", "7", False, True),
    (r"I'll put the answer in \boxed{} ... it is \boxed{42}", "42", True, True),
    (r"The answer is \boxed{18} \boxed{20}", "18", False, True),
    # #### form
    ("Step one.\n#### 18", "18", True, True),
    ("#### 1,000\n", "1000", True, True),
    ("#### $18.00", "18", True, True),
    ("#### 17", "18", False, True),
    # "the answer is"
    ("The answer is 18.", "18", True, True),
    ("So the answer is: $18.00.", "18", True, True),
    ("THE ANSWER IS 18", "18", True, True),
    ("The answer is **18**.", "18", True, True),
    ("**Final Answer:** 18", "18", True, True),
    ("The final answer is $\\$25$.", "25", True, True),
    ("The answer is 72 clips, because 48 + 24 = 72.", "72", True, True),
    ("The answer is 5 cm.", "5", True, True),
    ("The answer is -4.", "-4", True, True),
    ("The answer is 19.", "18", False, True),
    # the question's numbers echoed before the real answer
    (
        "Natalia sold 48 clips in April and 24 in May, so 72 in all. The answer is 72.",
        "72",
        True,
        True,
    ),
    (r"She starts with 48 apples; 48/2 = 24 more gives \boxed{72}.", "72", True, True),
    ("She starts with 48 apples, then adds 24. The answer is 48.", "72", False, True),
    # last-number fallback: counts for correctness, not for format
    ("48 + 24 = 72", "72", True, False),
    ("She earns 18 dollars", "18", True, False),
    ("Total: $1,000", "1000", True, False),
    ("It measures 5 cm", "5", True, False),
    ("The temperature drops to -3 degrees", "-3", True, False),
    ("So 10 - 3 leaves 7", "7", True, False),
    ("She needs 48 more, then 24", "72", False, False),
    # nothing usable
    ("I don't know.", "18", False, False),
    ("", "18", False, False),
    (r"Put the answer in \boxed{} please", "18", False, False),
    # wrong answers that must be False
    (r"\boxed{17.99}", "18", False, True),
    (r"\boxed{180}", "18", False, True),
    (r"\boxed{1.8}", "18", False, True),
    (r"\boxed{-18}", "18", False, True),
    (r"\boxed{18}", "-18", False, True),
    (r"\boxed{0.18}", "18", False, True),
    (r"\boxed{18, 20}", "18", False, True),
    (r"\boxed{18 or 20}", "18", False, True),
    (r"\boxed{\frac{1}{3}}", "0.33", False, True),
    (r"\boxed{2\sqrt{2}}", "3", False, True),
    (r"\boxed{\text{eighteen}}", "18", False, True),
    (r"\boxed{x}", "18", False, True),
    # an unclosed box (cut off by max_tokens) is not an answer
    (r"So we get \boxed{1", "18", False, False),
]


@pytest.mark.parametrize(("response", "truth", "correct", "has_answer"), GRADE_CASES)
def test_grade_table(response: str, truth: str, correct: bool, has_answer: bool) -> None:
    g = grade(response, truth)
    assert isinstance(g, Grade)
    assert (g.correct, g.has_answer) == (correct, has_answer), g


# What math-verify decides (the hand-written normaliser reads none of these as one number):
# (response, ground truth, correct)
MATH_VERIFY_CASES: list[tuple[str, str, bool]] = [
    (r"\boxed{2^3}", "8", True),
    (r"\boxed{10^2}", "100", True),
    (r"\boxed{\sqrt{324}}", "18", True),
    (r"\boxed{6 \cdot 3}", "18", True),
    (r"\boxed{(3+3) \times 3}", "18", True),
    (r"\boxed{1.5 \times 10^3}", "1500", True),
    (r"\boxed{y = 2 \times 9}", "18", True),
    (r"\boxed{\$18 \times 2}", "36", True),
    ("The answer is 2^3.", "8", True),
    ("#### 3*6", "18", True),
    (r"\boxed{2^4}", "8", False),
    (r"\boxed{3 \cdot 7}", "18", False),
    (r"\boxed{18 + 2}", "18", False),
    (r"\boxed{\sqrt{2}}", "1.414", False),
    (r"\boxed{3+4i}", "7", False),
    (r"\boxed{18 \text{ dollars and } 20 \text{ cents}}", "18", False),
]


@pytest.mark.parametrize(("response", "truth", "correct"), MATH_VERIFY_CASES)
def test_math_verify_decides_expressions(response: str, truth: str, correct: bool) -> None:
    assert normalize_number(extract_answer(response) or "") is None  # not a plain number
    assert grade(response, truth).correct is correct


def test_math_verify_is_asked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """math-verify's "equal" is final; the hand-written rules only add what it rejects."""
    asked: list[tuple[str, str]] = []

    def says_equal(pred: str, truth: str) -> bool:
        asked.append((pred, truth))
        return True

    monkeypatch.setattr(grading, "_math_verify_equal", says_equal)
    assert is_equivalent("17", "18")  # whatever math-verify says "equal" is equal
    assert asked == [("17", "18")]
    monkeypatch.setattr(grading, "_math_verify_equal", lambda pred, truth: False)
    assert is_equivalent("18 dollars", "18")  # the normaliser still reads plain numbers
    assert is_equivalent(r"\text{18}", "18")
    assert not is_equivalent("3 \\times 6", "18")  # only math-verify evaluates expressions


# (response, formatted = a final \boxed{}, has_answer = an answer was stated)
FORMAT_CASES: list[tuple[str, bool, bool]] = [
    (r"So \boxed{18}.", True, True),
    (r"#### 20, then finally \boxed{18}", True, True),
    (r"\boxed{18} and later #### 20", True, True),
    ("Step one.\n#### 18", False, True),
    ("The answer is 18.", False, True),
    ("48 + 24 = 72", False, False),
    (r"So we get \boxed{1", False, False),
    (r"Put the answer in \boxed{} please", False, False),
    ("no answer", False, False),
]


@pytest.mark.parametrize(("response", "formatted", "has_answer"), FORMAT_CASES)
def test_format_is_a_final_box(response: str, formatted: bool, has_answer: bool) -> None:
    g = grade(response, "18")
    assert (g.formatted, g.has_answer) == (formatted, has_answer), g
    assert (g.form == "boxed") is formatted


EXTRACT_CASES: list[tuple[str, str | None, str | None]] = [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed"),
    (r"a \boxed{1} b \boxed{\text{a}{b}} c", r"\text{a}{b}", "boxed"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}", "boxed"),
    (r"\boxed{5} and later #### 6", "5", "boxed"),
    ("#### 5\n#### 6\n", "6", "hashes"),
    ("The answer is 5. Also, the answer is 6.", "6", "answer_is"),
    ("The answer is simple: 7 + 8 = 15", "simple: 7 + 8 = 15", "answer_is"),
    ("The answer is obvious. We have 3 then 4", "4", "last_number"),
    ("costs 1,200 dollars", "1,200", "last_number"),
    ("a ratio of 3/4", "3/4", "last_number"),
    (r"equals \frac{3}{4}", r"\frac{3}{4}", "last_number"),
    ("ends with 18.", "18", "last_number"),
    ("5-3", "3", "last_number"),
    ("x2 and y", None, None),
    ("no digits here", None, None),
]


@pytest.mark.parametrize(("text", "expected", "form"), EXTRACT_CASES)
def test_extract_answer(text: str, expected: str | None, form: str | None) -> None:
    assert extract_answer_with_form(text) == (expected, form)
    assert extract_answer(text) == expected


NORMALIZE_CASES: list[tuple[str, float | None]] = [
    ("18", 18.0),
    ("18.00", 18.0),
    ("$18.00", 18.0),
    (r"\$18", 18.0),
    ("18%", 18.0),
    (r"18\%", 18.0),
    ("1,000", 1000.0),
    ("1{,}000", 1000.0),
    ("-3", -3.0),
    ("\u22123", -3.0),
    ("(-3)", -3.0),
    (".5", 0.5),
    ("1/2", 0.5),
    (r"\frac{3}{4}", 0.75),
    (r"-\frac{3}{4}", -0.75),
    (r"\dfrac{10}{4}", 2.5),
    ("18 dollars", 18.0),
    ("18.", 18.0),
    (r"90^\circ", 90.0),
    ("x = 7", 7.0),
    ("1e3", 1000.0),
    ("1/0", None),
    ("3 + 4", None),
    ("18 and 20", None),
    (r"2\sqrt{2}", None),
    ("", None),
    ("abc", None),
]


@pytest.mark.parametrize(("text", "value"), NORMALIZE_CASES)
def test_normalize_number(text: str, value: float | None) -> None:
    assert normalize_number(text) == value


def test_is_equivalent_edges() -> None:
    assert not is_equivalent(None, "18")
    assert not is_equivalent("   ", "18")
    assert is_equivalent("18.0000001", "18")  # within the relative tolerance
    assert not is_equivalent("18.001", "18")
    assert is_equivalent("1000000", "1,000,000")
    assert is_equivalent(r"12 + 6", "18")  # math-verify evaluates it
    assert not is_equivalent("12 + 7", "18")


def test_math_verify_fallback_works_in_worker_threads() -> None:
    """math-verify's signal timeouts raise outside the main thread; grading must not."""
    results: list[bool] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(grade(r"\boxed{3 \times 6}", "18").correct)
            results.append(grade(r"\boxed{\sqrt{2}}", "18").correct)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors
    assert results == [True, False]


def test_math_verify_guard_refuses_explosive_input() -> None:
    assert not is_equivalent("10^{10^{10}}", "18")
    assert not is_equivalent("100000!", "18")
    assert not is_equivalent("1 + " * 100 + "1", "101")  # too long to hand over


def test_reference_solutions_grade_correct(gsm8k_dir: Path) -> None:
    """GSM8K's own solutions ("... #### 72") must grade as correct against their truth."""
    examples = load_gsm8k("train", gsm8k_dir, limit=200)
    assert len(examples) == 200
    for ex in examples:
        g = grade(ex.answer, extract_ground_truth(ex.answer))
        assert g.correct and g.has_answer, (ex.index, ex.answer[-80:], g)
        # and a boxed restatement of the answer is just as good
        assert grade(rf"So \boxed{{{ex.ground_truth}}}.", ex.ground_truth).correct


needs_itimer = pytest.mark.skipif(
    not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread(),
    reason="needs POSIX interval timers in the main thread",
)


@needs_itimer
def test_math_verify_keeps_a_pending_alarm() -> None:
    """math-verify's own alarm(0) would cancel e.g. pytest-timeout's; grading must not."""
    fired: list[int] = []
    old_handler = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    old_timer = signal.setitimer(signal.ITIMER_REAL, 300.0)
    try:
        assert grade(r"\boxed{3 \times 6}", "18").correct
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.setitimer(signal.ITIMER_REAL, *old_timer)
        signal.signal(signal.SIGALRM, old_handler)
    assert not fired


@needs_itimer
def test_math_verify_uses_its_timeout_when_signals_are_free() -> None:
    old_handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    old_timer = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        assert _signal_timeout() is not None
        assert grade(r"\boxed{3 \times 6}", "18").correct
        assert not grade(r"\boxed{3 \times 7}", "18").correct
        assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # handler restored
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # no alarm left behind
    finally:
        signal.setitimer(signal.ITIMER_REAL, *old_timer)
        signal.signal(signal.SIGALRM, old_handler)


# (response, degenerate)
DEGENERATE_CASES: list[tuple[str, bool]] = [
    ("", True),  # blank
    ("  \n\n\t ", True),
    ("\n" * 128, True),
    ("!!!!", True),  # one short unit, 4 times or more
    ("the the the the", True),
    (" Rem Rem Rem Rem Rem ", True),
    ("abababab", True),
    ("x" * 300, True),
    ("She sells 9 eggs.\nShe sells 9 eggs.\n\n  She sells 9 eggs.  ", True),  # a loop
    ("a\nb\na\nb\na\nb", True),
    ("the the the", False),  # 3 repeats of a unit: not yet
    ("She sells 9 eggs.\nShe sells 9 eggs.\nSo she earns $18.", False),  # a line twice
    ("abcdefghij" * 4, False),  # the unit is longer than 8 characters
    ("\\[\nx = 1\n\\]\n\\[\ny = 2\n\\]\n\\[\nz = 3\n\\]", False),  # markup lines
    ("Janet has 16 eggs.\nShe eats 3 and bakes 4.\n16 - 3 - 4 = 9.\n\\boxed{18}", False),
    ("18", False),
    ("ab", False),
]


@pytest.mark.parametrize(("response", "degenerate"), DEGENERATE_CASES)
def test_is_degenerate(response: str, degenerate: bool) -> None:
    assert is_degenerate(response) is degenerate


def test_is_degenerate_is_fast_on_long_text() -> None:
    import time

    started = time.monotonic()
    assert not is_degenerate("ab " * 5000 + "c")
    assert is_degenerate("ab " * 5000)
    assert time.monotonic() - started < 1.0


def test_answer_rate_and_format_rate_differ() -> None:
    """A stated answer (``####``, "the answer is") counts for the answer rate only; a final
    ``\\boxed{}`` for both; a bare number for neither."""
    stated = grade("16 - 3 - 4 = 9, so she sells 9 eggs.\n#### 18", "18")
    boxed = grade("so \\boxed{18}", "18")
    bare = grade("16 - 3 - 4 = 9, so she earns 18", "18")
    assert (stated.has_answer, stated.formatted) == (True, False)
    assert (boxed.has_answer, boxed.formatted) == (True, True)
    assert (bare.has_answer, bare.formatted, bare.correct) == (False, False, True)
