"""Import a script that is not in a package (``bench/``, ``deploy/``) as a module, for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_script(path: Path) -> ModuleType:
    """The script at ``path`` (relative to the repository root or absolute), executed as a
    module named after its file. It stays in ``sys.modules`` under that name: dataclasses and
    pickling look their module up there."""
    path = path if path.is_absolute() else REPO_ROOT / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
