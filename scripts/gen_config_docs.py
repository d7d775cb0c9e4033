"""Regenerate the configuration reference in docs/trainer.md from the pydantic models.

    python scripts/gen_config_docs.py          # rewrite the generated part of docs/trainer.md
    python scripts/gen_config_docs.py --check  # exit 1 if it is out of date (CI / tests)

Only the text between the BEGIN/END markers is generated; the prose around it is edited by
hand. Descriptions come from each field's ``description`` or, for models documented with
``#:`` comments above their fields (trainer.algorithms.LossConfig), from those comments.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "trainer.md"
BEGIN = "<!-- BEGIN GENERATED CONFIG REFERENCE (scripts/gen_config_docs.py) -->"
END = "<!-- END GENERATED CONFIG REFERENCE -->"


# Fields documented nowhere in their model (LossConfig's undocumented ones); keep short.
FALLBACK = {
    "algorithm.algorithm": "advantage: reverse KL `c (tau - s)` or generalized JSD `-c j_t` (docs/design.md §4)",
    "algorithm.loss": "PPO clipped objective (with dual clip) or plain importance sampling `-A r`",
    "algorithm.aggregation": "loss reduction: mean over all response tokens, or the mean over "
    "sequences of each sequence's token mean / token sum",
}


def _comment_docs(cls: type) -> dict[str, str]:
    """``#: text`` comment lines directly above ``name: type`` lines of a class body."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"^(\w+)\s*:", stripped)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            return "(section)"
        return "**required**"
    value = field.default
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _section(name: str, model: type[BaseModel]) -> list[str]:
    comments = _comment_docs(model)
    doc = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    out = [
        f"### `{name}`",
        "",
        doc,
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for key, field in model.model_fields.items():
        desc = field.description or comments.get(key) or FALLBACK.get(f"{name}.{key}", "")
        desc = desc.replace("``", "`").replace("|", "\\|").replace("\n", " ")
        out.append(
            f"| `{name}.{key}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |"
        )
    out.append("")
    return out


def render() -> str:
    """The generated Markdown (between the markers)."""
    from trainer.config import TrainConfig

    top = [
        "### top level",
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    sections: list[str] = []
    for key, field in TrainConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections += _section(key, annotation)
        else:
            top.append(
                f"| `{key}` | {_type_name(annotation)} | {_default(field)} | {field.description or ''} |"
            )
    return "\n".join([BEGIN, "", *top, "", *sections, END])


def updated(text: str) -> str:
    """``text`` (the whole doc) with its generated part replaced."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN!r} / {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/trainer.md (or, with --check, report whether it is current)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the doc is out of date")
    args = p.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    new = updated(current)
    if args.check:
        if new != current:
            print(f"{DOC} is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
