"""`opd teacher` / `python -m services.teacher`: serve the teacher with uvicorn.

Flags override `OPD_*` env, which overrides defaults; `--help` lists them all.
"""

from __future__ import annotations

import sys

from services.common.app import serve
from services.common.settings import parse_settings
from services.teacher.app import TeacherSettings, build_app


def main(argv: list[str] | None = None) -> int:
    """Parse settings from `argv` (default: sys.argv[1:]) and serve until interrupted."""
    settings = parse_settings(TeacherSettings, sys.argv[1:] if argv is None else argv,
                              prog="opd teacher")
    serve(build_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
