"""The two ways a run ends badly: it could not start, or it stopped on the way."""

from __future__ import annotations

__all__ = ["FatalError", "StartupError"]


class StartupError(RuntimeError):
    """The run cannot start (services unreachable or incompatible, run dir in use, ...)."""


class FatalError(RuntimeError):
    """The run stopped; the message says why and what was saved."""
