"""Soak: N concurrent clients score against a real teacher process for a while; watch its memory.

    python bench/soak.py --model /tmp/demo/teacher --clients 32 --duration 240 --warmup 30

The teacher (`python -m services.teacher`, hf backend unless `--backend`) is started as a
subprocess on a free loopback port; `--env KEY=VALUE` (repeatable) sets its environment, e.g.
`--env MALLOC_ARENA_MAX=` to undo a default and compare. Each client loops: one `/v1/score`
request of `--sequences` random token sequences whose lengths are drawn from
`--min-len..--max-len` (varying shapes are what fragments an allocator), `--top-k`
alternatives, base64 arrays. Every answer is checked to carry one item per sequence.

Printed: the server's resident memory (VmRSS of the process and its children) every
`--sample-every` seconds, then a summary: RSS at start (model loaded, before the first
request), after the warm-up, at the end and its peak, the slope over the post-warm-up samples
(MiB per minute and per 1,000 requests: a plateau reads ~0), requests, errors and p50/p99
latency. `--json PATH` writes the same as JSON. Everything runs on 127.0.0.1 and stops after
`--duration` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/soak.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from services.launch import ServiceProcess, start_service  # noqa: E402

MIB = 1024 * 1024


def _children(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc), so engine worker processes count too."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may hold spaces: the fields after its closing ')' are fixed.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def rss_bytes(pid: int) -> dict[str, int]:
    """Resident memory of `pid` and its descendants, in bytes: `VmRSS` and its two parts,
    `RssAnon` (heap: tensors, Python objects, allocator caches) and `RssFile` (mapped files:
    shared libraries and safetensors weights, which are mapped, not copied, and page in on
    first use)."""
    total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for p in _children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in total:
                        total[key] += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@dataclass
class Sample:
    """One RSS reading."""

    t: float
    requests: int
    rss_mib: float
    anon_mib: float
    file_mib: float


@dataclass
class Report:
    """What one soak run measured."""

    clients: int
    duration_s: float
    warmup_s: float
    requests: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    rss_start_mib: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    anon_start_mib: float = 0.0
    anon_end_mib: float = 0.0
    file_start_mib: float = 0.0
    file_end_mib: float = 0.0
    slope_mib_per_min: float = 0.0
    slope_mib_per_1k_requests: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    samples: list[Sample] = field(default_factory=list)


class Soak:
    """Drive `clients` concurrent scoring loops against `base_url`, sampling `pid`'s RSS."""

    def __init__(self, args: argparse.Namespace, base_url: str, pid: int, vocab: int) -> None:
        self.args = args
        self.base_url = base_url
        self.pid = pid
        self.vocab = vocab
        self.requests = 0
        self.errors = 0
        self.error_examples: list[str] = []
        self.latencies: list[float] = []
        self.samples: list[Sample] = []
        self.t0 = 0.0

    def body(self, rng: np.random.Generator) -> dict[str, Any]:
        """One random scoring request."""
        a = self.args
        lengths = rng.integers(a.min_len, a.max_len + 1, size=a.sequences)
        return {
            "sequences": [{"token_ids": rng.integers(0, self.vocab, size=int(n)).tolist()}
                          for n in lengths],
            "top_k": a.top_k,
            "encoding": "base64",
        }

    async def client(self, index: int, http: httpx.AsyncClient, stop_at: float) -> None:
        rng = np.random.default_rng(self.args.seed + index)
        while time.monotonic() < stop_at:
            body = self.body(rng)
            start = time.perf_counter()
            try:
                response = await http.post("/v1/score", json=body)
                ok = (response.status_code == 200
                      and len(response.json()["data"]) == len(body["sequences"]))
                why = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                ok, why = False, repr(exc)
            self.latencies.append(time.perf_counter() - start)
            self.requests += 1
            if not ok:
                self.errors += 1
                if len(self.error_examples) < 5:
                    self.error_examples.append(why)

    async def sampler(self, stop_at: float) -> None:
        # run() takes the first and the last reading itself.
        while (left := stop_at - time.monotonic()) > self.args.sample_every / 2:
            await asyncio.sleep(min(self.args.sample_every, left))
            if time.monotonic() < stop_at:
                self.sample()

    def sample(self) -> Sample:
        mem = rss_bytes(self.pid)
        s = Sample(t=round(time.monotonic() - self.t0, 1), requests=self.requests,
                   rss_mib=round(mem["VmRSS"] / MIB, 1), anon_mib=round(mem["RssAnon"] / MIB, 1),
                   file_mib=round(mem["RssFile"] / MIB, 1))
        self.samples.append(s)
        print(f"  t={s.t:7.1f}s  requests={s.requests:6d}  rss={s.rss_mib:8.1f} MiB "
              f"(anon {s.anon_mib:7.1f}, file {s.file_mib:7.1f})", flush=True)
        return s

    async def run(self) -> Report:
        a = self.args
        limits = httpx.Limits(max_connections=a.clients, max_keepalive_connections=a.clients)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=a.request_timeout,
                                     limits=limits, headers=a.headers) as http:
            self.t0 = time.monotonic()
            start = self.sample()
            stop_at = self.t0 + a.duration
            await asyncio.gather(self.sampler(stop_at),
                                 *(self.client(i, http, stop_at) for i in range(a.clients)))
        end = self.sample()
        return self.report(start, end)

    def report(self, start: Sample, end: Sample) -> Report:
        a = self.args
        after = [s for s in self.samples if s.t >= a.warmup]
        warm = after[0] if after else end
        r = Report(clients=a.clients, duration_s=a.duration, warmup_s=a.warmup,
                   requests=self.requests, errors=self.errors,
                   error_examples=self.error_examples, rss_start_mib=start.rss_mib,
                   rss_after_warmup_mib=warm.rss_mib, rss_end_mib=end.rss_mib,
                   rss_peak_mib=max(s.rss_mib for s in self.samples),
                   anon_start_mib=start.anon_mib, anon_end_mib=end.anon_mib,
                   file_start_mib=start.file_mib, file_end_mib=end.file_mib,
                   samples=self.samples)
        if len(after) >= 3:
            t = np.array([s.t for s in after])
            n = np.array([s.requests for s in after], dtype=float)
            rss = np.array([s.rss_mib for s in after])
            r.slope_mib_per_min = round(float(np.polyfit(t, rss, 1)[0]) * 60, 2)
            if n[-1] > n[0]:
                r.slope_mib_per_1k_requests = round(float(np.polyfit(n, rss, 1)[0]) * 1000, 2)
        if self.latencies:
            ms = sorted(x * 1000 for x in self.latencies)
            r.p50_ms = round(statistics.median(ms), 1)
            r.p99_ms = round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1)
        return r


def _start(args: argparse.Namespace) -> ServiceProcess:
    server_args = ["--model", str(args.model), "--backend", args.backend, "--dtype", args.dtype,
                   "--device", "cpu", "--no-access-log", "--log-level", "warning",
                   "--max-concurrent-requests", str(max(args.clients, 1) * 2),
                   *args.server_arg]
    env = dict(kv.split("=", 1) for kv in args.env)
    # Not waited for here: the caller's `try` must own the process before the (long) load.
    return start_service("services.teacher", server_args, env=env, wait=False,
                         stop_signal=signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    """Run one soak and print (and optionally write) its report; 1 if any request failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, type=Path, help="teacher checkpoint directory")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=20.0,
                   help="seconds before the 'after warm-up' reading and the slope fit")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--sequences", type=int, default=2, help="sequences per request")
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server process (repeatable)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for the server (repeatable; e.g. --server-arg=--seed=1)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    args.headers = {}
    if os.environ.get("OPD_API_KEY"):
        args.headers = {"Authorization": f"Bearer {os.environ['OPD_API_KEY']}"}

    print(f"starting teacher ({args.backend}, {args.model}) ...", flush=True)
    server = _start(args)
    try:
        server.wait_ready(600)
        info = httpx.get(server.base_url + "/info", headers=args.headers, timeout=30).json()
        print(f"ready: {info['served_model_name']} vocab={info['vocab_size']} pid="
              f"{server.proc.pid}; {args.clients} clients for {args.duration:.0f}s", flush=True)
        soak = Soak(args, server.base_url, server.proc.pid, int(info["vocab_size"]))
        report = asyncio.run(soak.run())
        alive = server.alive()
    finally:
        server.stop()
    print(f"\nrequests {report.requests} ({report.requests / args.duration:.1f}/s), errors "
          f"{report.errors}, latency p50 {report.p50_ms} ms, p99 {report.p99_ms} ms")
    print(f"RSS MiB: start {report.rss_start_mib}, after warm-up ({args.warmup:.0f}s) "
          f"{report.rss_after_warmup_mib}, end {report.rss_end_mib}, peak {report.rss_peak_mib}")
    print(f"  of which anon (heap) {report.anon_start_mib} -> {report.anon_end_mib}, file-backed "
          f"(libraries, mapped weights) {report.file_start_mib} -> {report.file_end_mib}")
    print(f"RSS slope after warm-up: {report.slope_mib_per_min} MiB/min, "
          f"{report.slope_mib_per_1k_requests} MiB per 1,000 requests")
    for example in report.error_examples:
        print("  error:", example)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.errors == 0 and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
