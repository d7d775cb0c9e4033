"""Engine speed on the demo's shapes under the current environment (CPU thread binding).

    VLLM_CPU_KVCACHE_SPACE=2 python bench/cpu_binding.py --backend vllm --model DIR
    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0,1 python bench/cpu_binding.py ...

Times, in-process: engine start; two score calls of 8 prompts x 4 samples (600 shared
context tokens + 100 per prompt + 160 scored, top-16, prefix sharing on); two generate calls of
8 prompts x 4 samples x 160 new tokens (`ignore_eos`). Token ids are random. Run it once per
setting of `VLLM_CPU_OMP_THREADS_BIND` to compare vLLM's default binding with every core.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.engine import EngineConfig, ScoreInput, make_engine  # noqa: E402
from services.engine.base import SamplingSpec  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    engine = make_engine(
        EngineConfig(
            model=args.model,
            backend=args.backend,
            dtype="float32",
            device="cpu",
            max_model_len=1024,
            enforce_eager=True,
            seed=0,
        )
    )
    t = time.perf_counter()
    await engine.start()
    print(f"start {time.perf_counter() - t:.1f} s", flush=True)
    rng = np.random.default_rng(0)

    def batch() -> list[ScoreInput]:
        ctx = rng.integers(3, 30000, 600).tolist()
        out = []
        for _ in range(8):
            prompt = ctx + rng.integers(3, 30000, 100).tolist()
            for _ in range(4):
                ids = prompt + rng.integers(3, 30000, 160).tolist()
                out.append(ScoreInput(ids, start=len(prompt), top_k=16))
        return out

    try:
        await engine.score(batch()[:4])  # warm-up
        for _ in range(2):
            t = time.perf_counter()
            await engine.score(batch())
            print(f"score {time.perf_counter() - t:.1f} s", flush=True)
        prompts = [rng.integers(3, 30000, 100).tolist() for _ in range(8)]
        spec = SamplingSpec(n=4, max_tokens=160, temperature=1.0, seed=1, ignore_eos=True)
        for _ in range(2):
            t = time.perf_counter()
            await engine.generate(prompts, spec)
            print(f"generate {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        await engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":  # vLLM spawns its engine processes: the guard is required
    main()
