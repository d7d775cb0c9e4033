"""Retrying transient failures: exponential backoff with jitter that honours ``Retry-After``.

The retry loop is tenacity's. This module adds what tenacity does not know: the policy's knobs
(the ``services.max_attempts`` / ``retry_timeout_s`` / ``backoff_*_s`` config keys), a wait
that takes a server's ``Retry-After`` as a lower bound, and the parsing of that header.
Callers signal a failure worth retrying by raising :class:`TransientFailure`; anything else
goes up at once.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import tenacity

__all__ = ["RetriesExhausted", "RetryPolicy", "TransientFailure", "parse_retry_after"]

T = TypeVar("T")


class TransientFailure(Exception):
    """One attempt failed in a way that sending it again may fix (connection lost, 503, ...).

    ``retry_after``: the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RetriesExhausted(Exception):
    """Transient failures went on past ``max_attempts`` or ``deadline_s``."""

    def __init__(self, attempts: int, elapsed_s: float, last: str) -> None:
        super().__init__(f"gave up after {attempts} attempt(s) over {elapsed_s:.1f}s; last: {last}")
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last = last


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``min(max_s, initial_s * 2**(attempt-1))``, then a
    random factor in ``[0.5, 1]``; a server's ``Retry-After`` is a lower bound. Stops after
    ``max_attempts`` attempts, or before a wait that would end past ``deadline_s`` seconds."""

    max_attempts: int = 30
    deadline_s: float = 600.0
    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_s, self.initial_s * 2.0 ** (attempt - 1))
        # Jitter spreads the retries of many clients after one outage (no thundering herd).
        delay = base * (0.5 + 0.5 * rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_s))
        return delay

    def call(
        self,
        attempt: Callable[[], T],
        *,
        rng: random.Random,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[int, float, str], None] | None = None,
    ) -> T:
        """``attempt()`` until it returns, retrying while it raises :class:`TransientFailure`.

        ``on_retry(attempt_number, delay_s, failure)`` runs before each wait (for logging).

        Raises:
            RetriesExhausted: the policy ran out; it says how many attempts, how long, and
                the last failure.
        """

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hint = exc.retry_after if isinstance(exc, TransientFailure) else None
            return self.delay(state.attempt_number, hint, rng)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                on_retry(state.attempt_number, state.upcoming_sleep, str(state.outcome.exception()))

        def give_up(state: tenacity.RetryCallState) -> NoReturn:
            last = str(state.outcome.exception()) if state.outcome else "no attempt"
            raise RetriesExhausted(state.attempt_number, state.seconds_since_start or 0.0, last)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientFailure),
            wait=wait,
            stop=tenacity.stop_after_attempt(self.max_attempts)
            | tenacity.stop_before_delay(self.deadline_s),
            sleep=sleep,
            before_sleep=before_sleep,
            retry_error_callback=give_up,
        )
        return retrying(attempt)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
