"""Dockerfiles/: `hadolint` when installed (`scripts/install_tools.sh`), and always: pinned
bases, a non-root USER, a HEALTHCHECK, the dependency layer before the source copy, and every
Dockerfile compose builds exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_compose import compose_model
from tests.scripts import REPO_ROOT

DOCKERFILES = sorted((REPO_ROOT / "Dockerfiles").glob("*.Dockerfile"))


def _hadolint() -> str | None:
    for path in (
        shutil.which("hadolint"),
        Path(sys.executable).parent / "hadolint",
        REPO_ROOT / ".venv" / "bin" / "hadolint",
    ):
        if path and Path(path).is_file():
            return str(path)
    return None


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
    ]


def test_dockerfiles_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {
        "teacher.Dockerfile",
        "student_rollout.Dockerfile",
        "trainer.Dockerfile",
        "cpu.Dockerfile",
    } <= names
    compose_files = {
        svc["build"]["dockerfile"].split("/")[-1]
        for profile in ("gpu", "cpu")
        for svc in compose_model(profile)["services"].values()
        if "build" in svc
    }
    assert compose_files <= names
    ignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"**/.venv", "**/.git"} <= set(ignore)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path) -> None:
    ins = _instructions(path)
    froms = [args for op, args in ins if op == "FROM"]
    assert froms
    for image in froms:
        ref = image.split()[0]
        assert "$" not in ref, f"{ref}: pin the base in FROM itself"
        name, _, tag = ref.partition("@")[0].rpartition(":")
        assert "@sha256:" in ref or (name and tag and tag != "latest"), f"unpinned base {ref}"
        assert re.search(r"\d", tag or ref), f"{ref}: tag is not a version"
    users = [args.strip() for op, args in ins if op == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert any(op == "HEALTHCHECK" for op, _ in ins), "no HEALTHCHECK"
    copies = [args for op, args in ins if op == "COPY"]
    deps = next(i for i, c in enumerate(copies) if "pyproject.toml" in c)
    src = next(i for i, c in enumerate(copies) if c.split()[0] in ("opd", "services"))
    assert deps < src, "dependencies must be installed before the sources are copied"
    ports = {int(p) for op, args in ins if op == "EXPOSE" for p in args.split()}
    assert ports, "no EXPOSE"


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (scripts/install_tools.sh)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    out = subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
