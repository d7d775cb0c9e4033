"""The resolved compose model (docker-compose.yml, optionally with overrides) and readers of
its services' fields, shared by the deploy tests.

`docker compose config` (Compose v2; `scripts/install_tools.sh` installs it from PyPI, no
Docker engine needed) resolves the files; where Compose is absent, PyYAML with Compose's
interpolation, profiles and last-file-wins services stands in. Each profile is resolved once
per session (`compose_model` is cached).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.scripts import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


def _compose_command() -> list[str] | None:
    """`docker compose` or a standalone Compose v2+ binary; None when neither works (or when
    `OPD_TEST_NO_COMPOSE=1` asks for the PyYAML fallback)."""
    if os.environ.get("OPD_TEST_NO_COMPOSE") == "1":
        return None
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for path in (
        Path(sys.executable).parent / "docker-compose",
        REPO_ROOT / ".venv" / "bin" / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if path and Path(path).is_file():
            candidates.append([str(path)])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.match(r"v?(\d+)\.", out.stdout.strip())
        if out.returncode == 0 and match and int(match.group(1)) >= 2:
            return cmd
    return None


COMPOSE = _compose_command()


def _clean_env(tmp_dir: Path) -> dict[str, str]:
    """No COMPOSE_* or .env values leak in: the checks see the files' own defaults."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")}
    env["COMPOSE_PROJECT_NAME"] = "opd"
    return env


def _interpolate(text: str) -> str:
    """Compose-style `${VAR:-default}` / `${VAR}` / `$$` with an empty environment."""

    def sub(match: re.Match[str]) -> str:
        body = match.group(1)
        for sep in (":-", "-", ":?", "?"):
            if sep in body:
                return body.split(sep, 1)[1] if sep in (":-", "-") else ""
        return ""

    text = re.sub(r"\$\{([^}]*)\}", sub, text)
    return text.replace("$$", "$")


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML loader that accepts Compose's `!override` / `!reset` tags."""


_ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node, deep=True)
    ),
)
_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _yaml_model(files: Iterable[Path], profiles: Iterable[str]) -> dict[str, Any]:
    """The fallback: PyYAML with interpolation, profile filtering, last-file-wins services."""
    model: dict[str, Any] = {"services": {}, "volumes": {}}
    for file in files:
        data = yaml.load(_interpolate(file.read_text()), Loader=_ComposeLoader)  # noqa: S506
        for name, svc in (data.get("services") or {}).items():
            model["services"].setdefault(name, {}).update(svc)
        model["volumes"].update(data.get("volumes") or {})
    wanted = set(profiles)
    model["services"] = {
        name: svc
        for name, svc in model["services"].items()
        if not svc.get("profiles") or wanted & set(svc["profiles"])
    }
    return model


@functools.cache
def compose_model(profile: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved compose model for one profile (Compose's JSON, or the PyYAML fallback)."""
    files = [COMPOSE_FILE, *(REPO_ROOT / f for f in extra)]
    if COMPOSE is None:
        return _yaml_model(files, [profile])
    empty_env = REPO_ROOT / ".cache" / "empty.env"
    empty_env.parent.mkdir(exist_ok=True)
    empty_env.write_text("")
    args = [*COMPOSE, "--project-directory", str(REPO_ROOT), "--env-file", str(empty_env)]
    for file in files:
        args += ["-f", str(file)]
    args += ["--profile", profile, "config", "--format", "json"]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=120, env=_clean_env(REPO_ROOT), cwd=REPO_ROOT
    )
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stderr}"
    return json.loads(out.stdout)


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _ports(svc: dict[str, Any]) -> set[tuple[int, int]]:
    """(published, target) pairs, from Compose's long form or the short "h:c" strings."""
    out = set()
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            out.add((int(port["published"]), int(port["target"])))
        else:
            host, _, target = str(port).rpartition(":")
            out.add((int(host), int(target)))
    return out


def _mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only)."""
    out = {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            out[vol["target"]] = (str(vol.get("source")), bool(vol.get("read_only")))
        else:
            parts = str(vol).split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def _device_ids(svc: dict[str, Any]) -> list[str]:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []
    ids: list[str] = []
    for dev in devices:
        assert dev.get("driver") == "nvidia" and "gpu" in dev.get("capabilities", []), dev
        ids += [str(i) for i in dev.get("device_ids") or []]
    return ids


def _aliases(svc: dict[str, Any]) -> set[str]:
    nets = svc.get("networks") or {}
    if isinstance(nets, list):
        return set()
    return {a for net in nets.values() if net for a in net.get("aliases") or []}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _overrides(cmd: list[str]) -> dict[str, str]:
    return dict(c.split("=", 1) for c in cmd if "=" in c and not c.startswith("-"))
