"""Serving overhead: throughput through HTTP vs the same engine called in-process, same batch.

    python bench/serving.py --service teacher --model PATH --backend vllm --dtype float32 \\
        --batch 64 --seq-len 512            # GPU-sized default
    python bench/serving.py --service teacher --model PATH --backend vllm --dtype float32 \\
        --enforce-eager --batch 16 --seq-len 128 --repeats 3     # CPU-sized

What is measured (teacher): one batch of `--batch` random token sequences of `--seq-len`
tokens, scored from position 1 (`--top-k` alternatives if asked).

1. in-process: `make_engine(config)`, `start()`, then `await engine.score(batch)`.
2. HTTP: `python -m services.teacher` with the same engine flags in a subprocess (uvicorn,
   the production path); per `--encoding` the client serializes the request, POSTs it,
   parses the answer and decodes every array to numpy. All of that is inside the timing: it
   is what a trainer pays.

By default both are loaded at once and timed in alternation, `--repeats` rounds after
`--warmup` untimed ones (`--interleave`; shared hosts are noisy and this spreads the noise
evenly); `--no-interleave` runs the in-process engine first, shuts it down, then the server.

Throughput is scored tokens per second (`batch * (seq_len - 1)`), from the median time over
repeats (`--stat min`: the best time, the usual choice on a host shared with other jobs).
The ratio HTTP / in-process is printed per encoding (goal: >= 0.9 with base64).

Adding a service (hook): subclass `ServiceBench` (workload, in-process call, HTTP call,
server module) and register it in `BENCHES`, e.g. `BENCHES["rollout"] = RolloutBench`;
`--service rollout` then works with the same flags, runner and report.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/serving.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from services.engine import EngineConfig, ScoreInput, make_engine  # noqa: E402
from services.protocol import decode_array  # noqa: E402


@dataclass
class Measurement:
    """One configuration's timings."""

    label: str
    seconds: list[float]
    units: int  # tokens (or whatever the service counts) per repeat
    stat: str = "median"

    @property
    def median_s(self) -> float:
        """The reported time: median (default) or min of the repeats (`--stat`)."""
        return min(self.seconds) if self.stat == "min" else statistics.median(self.seconds)

    @property
    def per_s(self) -> float:
        return self.units / self.median_s


class ServiceBench(abc.ABC):
    """One service's benchmark: what to send, and how to send it in-process and over HTTP."""

    name: str = ""
    server_module: str = ""
    unit: str = "tokens"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Service-specific flags (none by default)."""
        return None

    @abc.abstractmethod
    def units(self) -> int:
        """Units of work per repeat (the throughput numerator)."""

    @abc.abstractmethod
    async def in_process(self, engine: Any) -> None:
        """One repeat through the engine object, results materialized."""

    @abc.abstractmethod
    def http(self, client: httpx.Client, encoding: str) -> None:
        """One repeat over HTTP: serialize, send, parse, decode."""

    def server_args(self) -> list[str]:
        """Extra flags for the server process (beyond the shared engine flags)."""
        return []


class TeacherBench(ServiceBench):
    """`/v1/score` of one batch of random sequences vs `engine.score` of the same batch."""

    name = "teacher"
    server_module = "services.teacher"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        rng = np.random.default_rng(args.seed)
        # Ids below 256 exist in every tokenizer we serve (and avoid specials near the top).
        self.sequences = [rng.integers(3, min(args.vocab_hint, 256), size=args.seq_len).tolist()
                          for _ in range(args.batch)]

    def units(self) -> int:
        return sum(len(s) - 1 for s in self.sequences)

    async def in_process(self, engine: Any) -> None:
        inputs = [ScoreInput(token_ids=s, start=1, top_k=self.args.top_k) for s in self.sequences]
        results = await engine.score(inputs)
        assert len(results) == len(inputs)

    def _bodies(self, encoding: str) -> list[bytes]:
        groups = np.array_split(np.arange(len(self.sequences)), self.args.concurrency)
        return [json.dumps({"sequences": [{"token_ids": self.sequences[i], "start": 1}
                                          for i in group],
                            "top_k": self.args.top_k, "encoding": encoding}).encode()
                for group in groups if len(group)]

    def http(self, client: httpx.Client, encoding: str) -> None:
        bodies = self._bodies(encoding)  # serialization is part of the client's cost

        def one(body: bytes) -> int:
            r = client.post("/v1/score", content=body,
                            headers={"Content-Type": "application/json"})
            r.raise_for_status()
            n = 0
            for item in r.json()["data"]:
                n += decode_array(item["logprobs"]).size
                if item.get("top_logprobs") is not None:
                    decode_array(item["top_logprobs"])
                    decode_array(item["top_token_ids"])
            return n

        if len(bodies) == 1:
            scored = one(bodies[0])
        else:
            with ThreadPoolExecutor(len(bodies)) as pool:
                scored = sum(pool.map(one, bodies))
        assert scored == self.units(), (scored, self.units())


class RolloutBench(ServiceBench):
    """`/v1/rollouts` of one batch of prompts vs `engine.generate` of the same batch.

    Workload: `--batch` random prompts of `--seq-len - --max-tokens` tokens, `--n` samples
    each, up to `--max-tokens` new tokens at temperature 1 with a fixed seed (so every repeat,
    in-process or over HTTP with `--concurrency 1`, generates the same tokens). The unit is
    generated tokens, counted from the answers of the last repeat (EOS may end a sample early;
    both paths then stop at the same place).
    """

    name = "rollout"
    server_module = "services.student_rollout"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        prompt_len = args.seq_len - args.max_tokens
        if prompt_len < 1:
            raise SystemExit("rollout: --seq-len must exceed --max-tokens (it is prompt + "
                             "max_tokens)")
        rng = np.random.default_rng(args.seed)
        self.prompts = [rng.integers(3, min(args.vocab_hint, 256), size=prompt_len).tolist()
                        for _ in range(args.batch)]
        self.generated = 0

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, default=4, help="rollout: samples per prompt")
        parser.add_argument("--max-tokens", type=int, default=128,
                            help="rollout: new tokens per sample (--seq-len is prompt + this)")

    def units(self) -> int:
        return self.generated

    async def in_process(self, engine: Any) -> None:
        from services.engine import SamplingSpec

        spec = SamplingSpec(n=self.args.n, max_tokens=self.args.max_tokens, temperature=1.0,
                            seed=self.args.seed)
        samples = await engine.generate(self.prompts, spec)
        self.generated = sum(len(s.token_ids) for per in samples for s in per)

    def http(self, client: httpx.Client, encoding: str) -> None:
        groups = np.array_split(np.arange(len(self.prompts)), self.args.concurrency)
        bodies = [json.dumps({"prompts": [{"token_ids": self.prompts[i]} for i in group],
                              "n": self.args.n, "max_tokens": self.args.max_tokens,
                              "temperature": 1.0, "seed": self.args.seed,
                              "encoding": encoding}).encode()
                  for group in groups if len(group)]

        def one(body: bytes) -> int:
            r = client.post("/v1/rollouts", content=body,
                            headers={"Content-Type": "application/json"})
            r.raise_for_status()
            n = 0
            for item in r.json()["data"]:
                n += decode_array(item["token_ids"]).size
                decode_array(item["logprobs"])
                decode_array(item["prompt_token_ids"])
            return n

        if len(bodies) == 1:
            self.generated = one(bodies[0])
        else:
            with ThreadPoolExecutor(len(bodies)) as pool:
                self.generated = sum(pool.map(one, bodies))

    def server_args(self) -> list[str]:
        return ["--max-n", str(max(self.args.n, 64))]


# Another service: subclass `ServiceBench` and register it here.
BENCHES: dict[str, type[ServiceBench]] = {"teacher": TeacherBench, "rollout": RolloutBench}


# --------------------------------------------------------------------------- runner


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine both paths use."""
    return EngineConfig(
        model=args.model, backend=args.backend, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len or args.seq_len, enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
    )


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The same engine as server flags."""
    flags = ["--model", args.model, "--backend", args.backend, "--dtype", args.dtype,
             "--device", args.device, "--max-model-len", str(args.max_model_len or args.seq_len),
             "--max-num-seqs", str(args.max_num_seqs),
             "--max-batch-tokens", str(args.max_batch_tokens),
             "--max-top-k", str(max(args.top_k, 20)), "--max-body-bytes", str(1 << 30),
             "--no-access-log", "--log-level", "warning"]
    flags.append("--enforce-eager" if args.enforce_eager else "--no-enforce-eager")
    return flags


async def run_in_process(bench: ServiceBench, args: argparse.Namespace) -> Measurement:
    """Time the engine called directly."""
    engine = make_engine(engine_config(args))
    await engine.start()
    try:
        for _ in range(args.warmup):
            await bench.in_process(engine)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            await bench.in_process(engine)
            seconds.append(time.perf_counter() - start)
    finally:
        await engine.shutdown()
    return Measurement("in-process", seconds, bench.units())


def run_http(bench: ServiceBench, args: argparse.Namespace) -> list[Measurement]:
    """Time the same work through a server subprocess, per encoding."""
    from tests.servers import start_server

    out = []
    with start_server(bench.server_module, engine_flags(args) + bench.server_args(),
                      ready_timeout=args.ready_timeout) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=None) as client:
        for encoding in args.encoding:
            for _ in range(args.warmup):
                bench.http(client, encoding)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                bench.http(client, encoding)
                seconds.append(time.perf_counter() - start)
            out.append(Measurement(f"http {encoding}", seconds, bench.units()))
    return out


async def run_interleaved(bench: ServiceBench, args: argparse.Namespace) -> list[Measurement]:
    """Both paths up at once, timed in alternation (in-process, then each encoding, per round).

    On a shared or noisy host, load changes hit every path alike instead of whichever ran
    during the busy minute; the idle path costs nothing (each waits on its socket or queue).
    """
    from tests.servers import start_server

    with start_server(bench.server_module, engine_flags(args) + bench.server_args(),
                      ready_timeout=args.ready_timeout) as srv, \
            httpx.Client(base_url=srv.base_url, timeout=None) as client:
        engine = make_engine(engine_config(args))
        await engine.start()
        try:
            paths: list[tuple[str, Any]] = [("in-process", None)]
            paths += [(f"http {enc}", enc) for enc in args.encoding]

            async def once(encoding: str | None) -> float:
                start = time.perf_counter()
                if encoding is None:
                    await bench.in_process(engine)
                else:
                    await asyncio.to_thread(bench.http, client, encoding)
                return time.perf_counter() - start

            for _ in range(args.warmup):
                for _, enc in paths:
                    await once(enc)
            seconds: dict[str, list[float]] = {label: [] for label, _ in paths}
            units: dict[str, int] = {}
            for _ in range(args.repeats):
                for label, enc in paths:
                    seconds[label].append(await once(enc))
                    units[label] = bench.units()
        finally:
            await engine.shutdown()
    return [Measurement(label, seconds[label], units[label]) for label, _ in paths]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags: service choice, model/engine, workload, repeats, output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--service", choices=sorted(BENCHES), default="teacher")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: --seq-len")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=64, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--vocab-hint", type=int, default=256,
                        help="random ids are drawn below min(this, 256)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="HTTP: split the batch into this many concurrent requests")
    parser.add_argument("--encoding", nargs="+", choices=["json", "base64"],
                        default=["json", "base64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="time reported per path")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--skip-in-process", action="store_true",
                        help="HTTP only (e.g. to profile the server)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                        help="load both paths at once and alternate them each round (fair "
                             "on a noisy host; needs memory for two engines); "
                             "--no-interleave: in-process first, engine shut down, then HTTP")
    parser.add_argument("--json-out", default=None, help="also write the results here")
    for bench in BENCHES.values():
        bench.add_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (and the HTTP / in-process ratios)."""
    args = parse_args(argv)
    if args.backend == "vllm":
        # vLLM-CPU otherwise reserves gpu_memory_utilization (90%) of the host's memory per
        # engine, and the interleaved run holds two; inherited by the server subprocess too.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    bench = BENCHES[args.service](args)
    results: list[Measurement] = []
    if args.interleave and not args.skip_in_process:
        results = asyncio.run(run_interleaved(bench, args))
    else:
        if not args.skip_in_process:
            results.append(asyncio.run(run_in_process(bench, args)))
            gc.collect()
        results += run_http(bench, args)

    base = results[0] if not args.skip_in_process else None
    print(f"\nservice={args.service} backend={args.backend} model={args.model} "
          f"batch={args.batch}x{args.seq_len} top_k={args.top_k} "
          f"concurrency={args.concurrency} repeats={args.repeats}")
    print(f"{'path':<16}{args.stat + ' s':>10}{bench.unit + '/s':>14}{'vs in-process':>15}")
    report = []
    for m in results:
        m.stat = args.stat
        ratio = m.per_s / base.per_s if base is not None else None
        print(f"{m.label:<16}{m.median_s:>10.3f}{m.per_s:>14.0f}"
              f"{'' if ratio is None else f'{ratio:>15.3f}'}")
        report.append({"path": m.label, f"{args.stat}_s": m.median_s, "per_s": m.per_s,
                       "seconds": m.seconds, "ratio": ratio})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": report},
                                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
