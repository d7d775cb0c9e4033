"""GSM8K grading: final-answer extraction and equivalence (docs/design.md §5).

The final answer of a response is, in this order of preference:

1. ``boxed``: the content of the last non-empty ``\\boxed{...}`` (nested braces allowed; also
   ``\\boxed {...}``, ``\\boxed 18`` and ``\\fbox{...}``); an unclosed box (a response cut
   off mid-answer) is ignored;
2. ``hashes``: the rest of the line after the last ``####``;
3. ``answer_is``: what follows the last "the answer is" / "final answer is" / "final
   answer:" (case-insensitive; optional ``:``, ``$``, ``**bold**``) up to the end of that
   sentence, when it contains a digit;
4. ``last_number``: the last number in the text.

This extraction is the project's own: ``math-verify``'s extractor knows neither ``####``
nor "the answer is", turns several boxes into a set (``\\boxed{7} ... \\boxed{5}`` gives
``{5, 7}`` where the last box is the answer) and ignores ``\\fbox``; and the form found is
needed to tell format from answer (below).

Two verdicts are kept apart. :attr:`Grade.formatted` is the *format*: the final answer is a
``\\boxed{}``, as the prompt asks; it is what ``format_rate`` counts. :attr:`Grade.has_answer`
says an answer was *stated* (forms 1-3); a bare last number is neither, yet every form counts
for correctness.

:func:`is_degenerate` flags answers that are not attempts at all, whatever they contain: the
text is *blank* (empty or whitespace only); or it is *one short unit repeated*: the stripped
text (runs of whitespace read as one space) is a unit of at most 8 characters (a word, a
symbol: a text-level stand-in for one token) said 4 times or more, optionally separated by
spaces (``"!!!!"``, ``"the the the the"``, ``"Rem Rem Rem Rem Rem"``); or it *loops*: the
same line, stripped, occurs 3 times or more. Lines without a letter or a digit (``\\[``,
``$$``, ``---``, code fences) do not count towards a loop, since a sound answer repeats
those. The rule looks at the text only, so it means the same for every model and tokenizer.

Equivalence: ``math-verify`` decides first, on the extracted answer stripped of presentation
(``$``, ``%``, ``\\text{}`` units, thousands separators, ``x = ...``), guarded: short inputs
only, every exception swallowed, its signal-based timeouts used only where they are safe
(see :func:`_math_verify_equal`). It evaluates expressions (``3 \\times 6``, ``2^3``,
``\\sqrt{324}``, ``\\frac{36}{2}``) and compares sets and equations. Where it does not
say "equal" (it reads words as variables: ``72 clips`` is ``72*c*i*l*p*s``; it cannot
parse ``\\text{18}``), the hand-written normaliser decides: one plain number with units or
words around it, compared as floats with a relative tolerance of 1e-6.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "STATED_FORMS",
    "AnswerForm",
    "Grade",
    "extract_answer",
    "extract_answer_with_form",
    "grade",
    "is_degenerate",
    "is_equivalent",
    "normalize_number",
]

AnswerForm = Literal["boxed", "hashes", "answer_is", "last_number"]
#: The forms in which an answer counts as stated (:attr:`Grade.has_answer`).
STATED_FORMS: frozenset[str] = frozenset({"boxed", "hashes", "answer_is"})

REL_TOL = 1e-6
ABS_TOL = 1e-9

# A plain number: thousands-separated or plain digits, optional decimals and exponent.
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
# A minus sign only where it cannot be a binary minus ("5-3" gives 5 and 3, not -3).
_SIGNED_NUM = rf"(?:(?<![^\s($=:{{\[])-\s?)?(?<![\w.])(?:{_NUM})"
_FRACTION_RE = re.compile(
    rf"\\[dt]?frac\s*\{{\s*(-?(?:{_NUM}))\s*\}}\s*\{{\s*(-?(?:{_NUM}))\s*\}}"
    rf"|\\[dt]?frac\s*(\d)\s*(\d)"
)
# The last-number fallback also takes "\frac{a}{b}" and "a/b" whole.
_LAST_NUMBER_RE = re.compile(
    rf"\\[dt]?frac\s*\{{\s*-?(?:{_NUM})\s*\}}\s*\{{\s*-?(?:{_NUM})\s*\}}"
    rf"|{_SIGNED_NUM}(?:/(?:{_NUM}))?"
)
# One number (or fraction) with nothing but words/punctuation around it.
_STRICT_RE = re.compile(
    rf"^(?P<pre>[^\d+\-*/^=<>\\{{}}|]*?)"
    rf"(?P<num>-?\s?(?:{_NUM}))(?:\s*/\s*(?P<den>-?(?:{_NUM})))?"
    rf"(?P<post>[^\d+\-*/^=<>\\{{}}|]*)$"
)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:\banswer\s+is|\bfinal\s+answer(?:\s+is)?)\b[\s*_]*(?::|=|\bis\b)?[\s*_]*",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|\n|,\s|;|\s\(|\s(?:because|since|which|so)\b")

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)\s*"
    r"\{([^{}]*)\}"
)
_SPACING_RE = re.compile(
    r"\\(?:left|right|displaystyle|quad|qquad|big|Big|bigg|Bigg)(?![A-Za-z])|\\[,;:! ]"
)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_UNIT_POWER_RE = re.compile(r"([A-Za-z])\s*(?:\^\s*\{?\s*[23]\s*\}?|[²³])")
_MINUS_RE = re.compile(r"[\u2212\u2013\u2014]")

# Degenerate answers (is_degenerate): one unit of <= 8 characters said 4+ times; a line said 3+.
_REPEATED_UNIT_RE = re.compile(r"(.{1,8}?)(?: ?\1){3,}", re.DOTALL)
_LOOP_LINES = 3

# math-verify guard: inputs it may see, and how long it may take where signals are usable.
_MV_MAX_CHARS = 120
_MV_TIMEOUT_S = 2
_MV_DANGEROUS_RE = re.compile(r"\d{31,}|\^\s*\{?\s*\d{4,}|!|\^[^^]*\^")


@dataclass
class Grade:
    """The grade of one response.

    ``correct``: its final answer equals the ground truth.
    ``has_answer``: an answer was stated (boxed, ``####`` or "the answer is"); a bare last
    number is not.
    ``extracted``: the raw final-answer text that was compared (``None``: nothing found).
    ``form``: where it was found (``None``: nowhere).
    ``formatted``: the format the prompt asks for, a final ``\\boxed{}``; what the trainer's
    ``format_rate`` counts.
    """

    correct: bool
    has_answer: bool
    extracted: str | None
    form: AnswerForm | None = None

    @property
    def formatted(self) -> bool:
        """Whether the final answer is a ``\\boxed{}`` (the requested format)."""
        return self.form == "boxed"


def _boxed_contents(text: str) -> list[str]:
    """Contents of every closed ``\\boxed``/``\\fbox`` in order of appearance."""
    found: list[str] = []
    for match in _BOX_RE.finditer(text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            i = start
            while i < len(text):
                ch = text[i]
                if ch == "\\":
                    i += 2  # an escaped character (\{, \}, \$) never opens or closes
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        found.append(text[start + 1 : i])
                        break
                i += 1
        else:  # "\boxed 18": one TeX token, which must hold a digit
            token = re.match(r"-?[\w.,/]*\d[\w.,/]*", text[start:])
            if token:
                found.append(token.group(0))
    return found


def _answer_is_candidate(text: str) -> str | None:
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        rest = text[match.end() :]
        end = _SENTENCE_END_RE.search(rest)
        candidate = (rest[: end.start()] if end else rest).strip().strip("*_").strip()
        if re.search(r"\d", candidate):
            return candidate
    return None


def extract_answer_with_form(text: str) -> tuple[str | None, AnswerForm | None]:
    """The final answer of ``text`` and which form it was found in (see module docs).

    Returns ``(None, None)`` when the text holds no answer at all (not even a number).
    """
    boxes = [b.strip() for b in _boxed_contents(text)]
    boxes = [b for b in boxes if b]
    if boxes:
        return boxes[-1], "boxed"
    hashes = [m.group(1).strip() for m in _HASHES_RE.finditer(text)]
    hashes = [h for h in hashes if h]
    if hashes:
        return hashes[-1], "hashes"
    candidate = _answer_is_candidate(text)
    if candidate is not None:
        return candidate, "answer_is"
    numbers = _LAST_NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1].strip(), "last_number"
    return None, None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last ``\\boxed{}``, else ``#### x``, else "the
    answer is x", else the last number; ``None`` when there is none."""
    return extract_answer_with_form(text)[0]


def _latex_cleanup(s: str) -> str:
    """Strip presentation from an answer: dollars, percent, spacing, ``\\left``, "x =", ..."""
    s = _MINUS_RE.sub("-", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = _DEGREE_RE.sub("", s)
    s = _SPACING_RE.sub(" ", s)
    s = re.sub(r"\\?[$%]|\\[()\[\]]", " ", s)
    for sep in ("\\approx", "=", "\\equiv"):
        if sep in s:
            s = s.rsplit(sep, 1)[1]
    s = s.strip().strip("*_").strip()
    while s.endswith((".", ",", ";", ":", "!", "?")):
        s = s[:-1].rstrip()
    return s


def _unwrap_text(s: str, keep: bool = True) -> str:
    """Replace ``\\text{...}`` (and friends, nested) by their content, or drop them."""
    while True:
        new = _TEXT_CMD_RE.sub(lambda m: f" {m.group(1)} " if keep else " ", s)
        if new == s:
            return s
        s = new


def _to_float(num: str) -> float | None:
    try:
        value = float(num.replace(",", "").replace(" ", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize_number(s: str) -> float | None:
    """The number an answer string states, or ``None`` when it is not one plain number.

    Handles ``$18.00``, ``\\$18``, ``18%``, ``1,000``, ``-3``, ``0.5``, ``1/2``,
    ``\\frac{1}{2}``/``\\dfrac12``, ``\\text{...}``, ``\\left(...\\right)``, ``x = 18``,
    units or words around the number (``18 dollars``, ``5 cm^2``) and trailing periods.
    Anything with two numbers or an operator (``3 + 4``, ``2\\sqrt{2}``) gives ``None``.
    """
    if not s or not s.strip():
        return None
    t = _latex_cleanup(s)
    t = _unwrap_text(t)
    t = _UNIT_POWER_RE.sub(r"\1", t)

    def frac(m: re.Match[str]) -> str:
        a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        return f"{a}/{b}"

    t = _FRACTION_RE.sub(frac, t)
    t = re.sub(r"^\{\s*(.*?)\s*\}$", r"\1", t.strip())  # a lone brace group: "{18}"
    t = re.sub(r"(?<!\S)\(\s*(-?[\d.,/\s]+?)\s*\)(?!\S)", r"\1", t)  # "(-3)"
    t = _latex_cleanup(t)
    match = _STRICT_RE.match(t)
    if match is None:
        return None
    value = _to_float(match.group("num"))
    if value is None:
        return None
    den = match.group("den")
    if den is not None:
        denominator = _to_float(den)
        if denominator is None or denominator == 0:
            return None
        value /= denominator
    return value


def _signal_timeout() -> int | None:
    """Seconds math-verify may use as its SIGALRM timeout here, or ``None`` for no timeout.

    math-verify's timeouts call ``signal.signal``/``signal.alarm``, which raise outside the
    main thread, and which would silently cancel somebody else's pending alarm (e.g.
    pytest-timeout's) in it. So they are only used in the main thread with no alarm set.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            return None
        if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            return None
    except (AttributeError, ValueError, OSError):  # no SIGALRM (Windows) and the like
        return None
    return _MV_TIMEOUT_S


def _for_math_verify(s: str) -> str:
    s = _latex_cleanup(s)
    s = _unwrap_text(s, keep=False)  # units in \text{} are not part of the value
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s).strip()


class _NoTimeoutWarning(logging.Filter):
    """Drops math-verify's "Timeout is disabled" warning, logged on every call without a
    timeout: here that is deliberate (worker threads) and the input was vetted beforehand."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def _math_verify_equal(pred: str, truth: str) -> bool:
    """``math-verify``'s opinion, guarded; any failure, timeout or oversized input is False.

    Without a usable signal timeout (worker threads, or an alarm already pending) it runs
    with timeouts disabled, so inputs that could make sympy explode (long digit runs, big
    or stacked exponents, factorials) are refused beforehand.
    """
    pred, truth = _for_math_verify(pred), _for_math_verify(truth)
    if not pred or not truth:
        return False
    for s in (pred, truth):
        if len(s) > _MV_MAX_CHARS or _MV_DANGEROUS_RE.search(s):
            return False
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        return False
    timeout = _signal_timeout()
    try:
        gold = parse(f"${truth}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        target = parse(f"${pred}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return False


def _plain(s: str) -> str:
    return re.sub(r"\s+", "", _latex_cleanup(s)).lower()


def _numerically_equal(pred: str, truth: str) -> bool:
    p, t = normalize_number(pred), normalize_number(truth)
    if p is None or t is None:
        return False
    return math.isclose(p, t, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def is_equivalent(pred: str | None, truth: str) -> bool:
    """Whether a predicted final answer equals the ground truth.

    ``math-verify`` decides first (guarded, see :func:`_math_verify_equal`). What it does
    not call equal is given to the hand-written rules: both sides normalised with
    :func:`normalize_number` and compared as floats (relative tolerance 1e-6), else an exact
    match of the whitespace-free, lower-cased, cleaned strings. The hand-written rules only
    ever accept one plain number (or the identical string), so they add the answers
    ``math-verify`` misreads (words and units around a number) and nothing looser.
    """
    if pred is None or not pred.strip():
        return False
    if _math_verify_equal(pred, truth):
        return True
    if _numerically_equal(pred, truth):
        return True
    return bool(_plain(truth)) and _plain(pred) == _plain(truth)


def is_degenerate(text: str) -> bool:
    """Whether ``text`` is blank, one short unit repeated, or a loop (see the module docs)."""
    stripped = text.strip()
    if not stripped:
        return True
    if _REPEATED_UNIT_RE.fullmatch(re.sub(r"\s+", " ", stripped)):
        return True
    counts: dict[str, int] = {}
    for line in stripped.splitlines():
        line = line.strip()
        if not re.search(r"[^\W_]", line):  # blank, or no letter or digit
            continue
        counts[line] = counts.get(line, 0) + 1
        if counts[line] >= _LOOP_LINES:
            return True
    return False


def grade(response: str, ground_truth: str) -> Grade:
    """Grade one response against a GSM8K ground truth (see :class:`Grade`)."""
    extracted, form = extract_answer_with_form(response)
    return Grade(
        correct=is_equivalent(extracted, ground_truth),
        has_answer=form in STATED_FORMS,
        extracted=extracted,
        form=form,
    )
