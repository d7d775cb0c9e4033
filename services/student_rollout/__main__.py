"""`opd rollout` / `python -m services.student_rollout`: serve the student with uvicorn.

Flags override `OPD_*` env, which overrides defaults; `--help` lists them all. Example:

    opd rollout --model ./student --backend hf --weights-dir ./runs/ckpt --port 8002
"""

from __future__ import annotations

import sys

from services.common.app import serve
from services.common.settings import parse_settings
from services.student_rollout.app import build_app
from services.student_rollout.settings import RolloutSettings


def main(argv: list[str] | None = None) -> int:
    """Parse settings from `argv` (default: sys.argv[1:]) and serve until interrupted."""
    settings = parse_settings(
        RolloutSettings, sys.argv[1:] if argv is None else argv, prog="opd rollout"
    )
    serve(build_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
