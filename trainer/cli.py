"""Command lines: ``opd train`` (also ``python -m trainer`` and under ``torchrun``) and
``opd eval``.

```
opd train examples/opd_gsm8k/opd_gsm8k.yaml trainer.lr=2e-5 algorithm.kl_coef=0.5
opd train --resume runs/opd_gsm8k                 # after a crash or kill -9
torchrun --nproc-per-node 2 -m trainer cfg.yaml  # FSDP2 over 2 devices
opd eval --model http://localhost:8001 --limit 200
```

Exit codes: 0 done, 2 invalid config or arguments (nothing was started), 3 could not start
(services unreachable or incompatible, run dir in use), 1 stopped by an error mid-run (after
saving what could be saved).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.config import ConfigError, dump_config, load_config

__all__ = ["eval_main", "train_main"]


def _parse_train_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="opd train",
        description="On-policy distillation of a student from a teacher (see docs/trainer.md).",
        epilog="Overrides are dotted keys with YAML values, e.g. trainer.lr=2e-5 "
        "algorithm.algorithm=jsd eval.limit=200.",
    )
    p.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml | key=value", help="a YAML config, then overrides"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue a run from its latest checkpoint",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # Intermixed: options may come before, between or after the config and the overrides.
    return p.parse_intermixed_args(list(argv))


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"
        if "WORLD_SIZE" in os.environ
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Per-request INFO lines from httpx would drown the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("huggingface_hub").setLevel(logging.WARNING)


def train_main(argv: Sequence[str]) -> int:
    """``opd train CONFIG.yaml [key=value ...] [--resume RUN_DIR]``."""
    args = _parse_train_args(argv)
    configs = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(configs) > 1:
        print(f"opd train: error: one config file expected, got {configs}", file=sys.stderr)
        return 2
    path: str | None = configs[0] if configs else None
    if args.resume:
        run_dir = Path(args.resume)
        if path is None:
            path = str(run_dir / "config.yaml")
        overrides = [f"run_dir={run_dir}", *overrides]
    elif path is None:
        print("opd train: error: give a config file (or --resume RUN_DIR)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        print(f"opd train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    _setup_logging(cfg.logging.level)
    # Imported after validation so a bad config fails without importing torch.
    from trainer.errors import StartupError
    from trainer.loop import train

    try:
        train(cfg, resume=bool(args.resume))
    except StartupError as exc:
        print(f"opd train: cannot start: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("opd train: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"opd train: stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def eval_main(argv: Sequence[str]) -> int:
    """``opd eval --model URL-or-path [--limit N] ...`` (see :mod:`trainer.eval`)."""
    from trainer.eval import eval_main as run

    return run(argv)
