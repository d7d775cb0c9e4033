"""`opd`: one entry point; each subcommand is a module with `main(argv) -> int`.

Subcommands are imported only when run, so `opd --help` is instant and a service host does not
import the trainer (or the other way round).
"""

from __future__ import annotations

import importlib
import sys

from opd import __version__

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "teacher": ("services.teacher.__main__:main", "serve a frozen teacher model (/v1/score)"),
    "rollout": (
        "services.student_rollout.__main__:main",
        "serve the student for rollouts and weight updates",
    ),
    "train": ("trainer.cli:train_main", "run on-policy distillation from a YAML config"),
    "eval": ("trainer.cli:eval_main", "GSM8K accuracy of an endpoint or checkpoint"),
    "plot": ("trainer.plots:main", "write PNG plots of a run directory"),
    "demo": ("opd.demo:main", "the whole loop on CPU with small embedded models"),
    "version": ("opd.cli:version_main", "print the version"),
}


def version_main(argv: list[str]) -> int:
    """Print the package version."""
    print(f"opd {__version__}")
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: opd <command> [options]",
        "",
        "On-policy distillation: a student samples, a teacher scores its tokens, the student",
        "learns from the per-token logprob gap.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `opd <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `opd <command> ...` to the command's module."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        return version_main([])
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"opd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
