"""The teacher service: a frozen model that scores token sequences (`POST /v1/score`).

`build_app(settings)` makes the FastAPI app; `main(argv)` (also `opd teacher` and
`python -m services.teacher`) parses flags / `OPD_*` env and serves it with uvicorn.
"""

from services.teacher.app import TeacherSettings, build_app

__all__ = ["TeacherSettings", "build_app"]
