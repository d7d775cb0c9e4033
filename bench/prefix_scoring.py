"""Teacher scoring with and without prefix sharing, on batches shaped like the demo's.

    python bench/prefix_scoring.py --model /tmp/demo-models/teacher --backend hf vllm

One score call = `--prompts` prompts x `--samples` samples: every sequence starts with the
same `--context` tokens (the teacher context: a few-shot chat), then its prompt's
`--question` tokens, then its own `--completion` tokens; scoring starts at the completion
(`start` = prompt length), as the trainer sends it. Token ids are random (the cost does not
depend on them), and every timed call gets a fresh batch, so vLLM's prefix cache never
serves one call from an earlier one.

Per backend the engine is loaded once (in-process, `engine.score`) and the two settings are
timed in alternation, `--repeats` rounds after `--warmup` untimed ones. A check batch is
scored both ways (sharing first, so vLLM's cache holds nothing of it yet) and the largest
difference printed. Without `--model` the tiny random Llama of `opd.tiny` is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/prefix_scoring.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from services.engine import EngineConfig, ScoreInput, make_engine  # noqa: E402


def make_batch(args: argparse.Namespace, rng: np.random.Generator, vocab: int) -> list[ScoreInput]:
    """One call's sequences: shared context, one question per prompt, one completion each."""
    high = min(vocab, 32000)
    context = rng.integers(3, high, args.context).tolist()
    inputs = []
    for _ in range(args.prompts):
        prompt = context + rng.integers(3, high, args.question).tolist()
        for _ in range(args.samples):
            ids = prompt + rng.integers(3, high, args.completion).tolist()
            inputs.append(
                ScoreInput(ids, start=len(prompt), top_k=args.top_k, temperature=args.temperature)
            )
    return inputs


def set_sharing(engine: Any, on: bool) -> None:
    if engine.info().backend == "vllm":
        from services.engine.vllm.scoring import set_prefix_sharing

        set_prefix_sharing(engine, on)
    else:
        engine.prefix_sharing = on


async def bench_backend(args: argparse.Namespace, model: str, backend: str) -> dict[str, Any]:
    config = EngineConfig(
        model=model,
        backend=backend,
        dtype=args.dtype,
        device="cpu",
        max_model_len=args.max_model_len,
        enforce_eager=True,
        max_batch_tokens=args.max_batch_tokens,
        seed=0,
    )
    engine = make_engine(config)
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    try:
        vocab = engine.info().vocab_size
        rng = np.random.default_rng(args.seed)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.warmup + args.repeats):
            for on in (r % 2 == 0, r % 2 != 0):  # alternate which setting goes first
                batch = make_batch(args, rng, vocab)
                set_sharing(engine, on)
                t = time.perf_counter()
                await engine.score(batch)
                elapsed = time.perf_counter() - t
                if r >= args.warmup:
                    times[on].append(elapsed)
                label = "warmup" if r < args.warmup else f"repeat {r - args.warmup + 1}"
                print(
                    f"  {backend} {label}: sharing {'on' if on else 'off'} {elapsed:.2f} s "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        check = make_batch(args, rng, vocab)
        stats = None
        if backend == "vllm":
            from services.engine.vllm.scoring import prefix_stats

            before = dict(vars(prefix_stats(engine)))
        set_sharing(engine, True)
        shared = await engine.score(check)
        if backend == "vllm":
            after = vars(prefix_stats(engine))
            stats = {k: after[k] - before[k] for k in after}
        set_sharing(engine, False)
        plain = await engine.score(check)
        diff = max(
            float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(shared, plain, strict=True)
        )
        if args.top_k:
            diff = max(
                diff,
                *(
                    float(np.abs(a.top_logprobs - b.top_logprobs).max())
                    for a, b in zip(shared, plain, strict=True)
                ),
            )
    finally:
        await engine.shutdown()
    stat = min if args.stat == "min" else statistics.median
    off, on = stat(times[False]), stat(times[True])
    return {
        "backend": backend,
        "start_s": start_s,
        "off_s": off,
        "on_s": on,
        "off_all": times[False],
        "on_all": times[True],
        "max_abs_diff": diff,
        "check_stats": stats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a tiny random Llama)")
    p.add_argument("--backend", nargs="+", default=["hf"], choices=["hf", "vllm"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--context", type=int, default=600, help="shared teacher-context tokens")
    p.add_argument("--question", type=int, default=100, help="tokens per prompt after it")
    p.add_argument("--completion", type=int, default=160, help="scored tokens per sample")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="hf batch budget")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="reported time of the repeats (min: for a host shared with other jobs)",
    )
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    model = args.model
    tmp = None
    if model is None:
        from opd.tiny import build_model

        tmp = tempfile.TemporaryDirectory()
        model = str(build_model(Path(tmp.name) / "tiny", max_position_embeddings=2048))
    seq_len = args.context + args.question + args.completion
    n = args.prompts * args.samples
    print(
        f"model {model}: {n} sequences of {seq_len} tokens ({args.context} shared, "
        f"{args.question} per prompt, {args.completion} scored), top_k {args.top_k}, "
        f"T {args.temperature}"
    )
    for backend in args.backend:
        res = asyncio.run(bench_backend(args, model, backend))
        scored = n * args.completion
        print(
            f"{backend} ({args.stat}): sharing off {res['off_s']:.2f} s, on {res['on_s']:.2f} s, "
            f"ratio {res['off_s'] / res['on_s']:.2f}x; "
            f"{scored / res['off_s']:.0f} -> {scored / res['on_s']:.0f} scored tokens/s; "
            f"max |on - off| {res['max_abs_diff']:.2e}; engine start {res['start_s']:.0f} s"
        )
        print(
            f"  off runs {[round(t, 2) for t in res['off_all']]}, "
            f"on runs {[round(t, 2) for t in res['on_all']]}"
        )
        if res["check_stats"] is not None:
            print(f"  vllm prefix cache on the check batch: {res['check_stats']}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
