"""Benchmarks of the trainer's fused kernels.

``python bench/kernels.py [opd-loss] ...``: the fused OPD loss (below).
``python bench/kernels.py linear-logprob ...``: the fused LM-head + log-softmax kernel against
the chunked torch path, Liger-Kernel and Cut Cross-Entropy (see ``linear_logprob_main``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import kernels_opd_loss  # noqa: E402
from bench.kernels_linear_logprob import linear_logprob_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """``[opd-loss] ARGS`` (the default) or ``linear-logprob ARGS``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "linear-logprob":
        return linear_logprob_main(argv[1:])
    if argv and argv[0] == "opd-loss":
        argv = argv[1:]
    # The default command's --help reads as one text: the two commands, then what "below" is.
    return kernels_opd_loss.opd_loss_main(argv, f"{__doc__}\n{kernels_opd_loss.__doc__}")


if __name__ == "__main__":
    sys.exit(main())
