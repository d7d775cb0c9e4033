"""Step pipelining: the trainer's scheduling of one step, measured against STAND-IN services.

    python bench/pipeline.py                      # the defaults below; under a minute
    python bench/pipeline.py --rollout-s 0.4 --score-s 0.4 --train-s 2 --weight-load-s 0.1 \\
        --chunks 4 --steps 5 --sequential         # also the schedule before pipelining

This measures orchestration, not the engines. The teacher and the rollout service are
stand-ins: small FastAPI apps served by uvicorn on threads of this process, answering
``/ready``, ``/info``, ``POST /v1/rollouts``, ``POST /v1/score``, ``GET /v1/weights`` and
``POST /v1/weights/load`` in the wire shapes of :mod:`services.protocol`, but instead of a
model each request sleeps: ``--rollout-s`` per rollout request (one chunk of
``--prompts-per-request`` prompts), ``--score-s`` per score request (one chunk's samples),
``--weight-load-s`` per weight load. A stand-in serves ``--slots`` requests at a time
(default 1: an engine kept busy, so a chunk's samples come back one chunk after another) and
a weight load waits for the requests being served and holds up the next ones (the swap
pauses sampling). The training step is a stand-in too: ``time.sleep(--train-s)``.

What is real is the trainer's side: :class:`trainer.connections.Services` (the HTTP clients,
replica pools, the weight sync by path), :class:`trainer.producer.BatchProducer` and
:func:`trainer.batches.make_batch` (the pipelined schedule), driven like
:meth:`trainer.loop.Trainer.run` drives them (wait for the batch, train, push the weights),
with ``sync.max_staleness`` K = 0 and 1.

For each K it prints the median step time (the first step left out: it has nothing to overlap
with) against the stand-ins' work per step, ``rollout = ceil(chunks / slots) * rollout-s``,
``score`` likewise and ``train``: ``step / max(rollout, score, train)`` (target for K=1:
within 1.1x) and ``step / (rollout + score + train)`` (target for K=0: below 1, i.e. the
scoring overlaps the sampling). ``--sequential`` adds rows for the schedule before pipelining
(all rollouts, then all scoring, then grading).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/pipeline.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from services.launch import free_port  # noqa: E402
from services.protocol import (  # noqa: E402
    RolloutItem,
    RolloutRequest,
    RolloutResponse,
    RolloutUsage,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
    WeightsLoadRequest,
    WeightsStatus,
    encode_array,
)
from trainer.batches import (  # noqa: E402
    Batch,
    assemble_batch,
    grade_rollouts,
    sample_rollouts,
    score_rollouts,
)
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.config_sections import TeacherContextConfig  # noqa: E402
from trainer.connections import Services  # noqa: E402
from trainer.data import Example, PromptSampler  # noqa: E402
from trainer.producer import BatchProducer  # noqa: E402
from trainer.teacher_context import TeacherContext  # noqa: E402
from trainer.timing import timed  # noqa: E402
from trainer.weight_sync import WEIGHTS_FILE  # noqa: E402

FINGERPRINT = "0" * 64  # one "tokenizer" for both stand-ins


# --------------------------------------------------------------------------------- stand-ins


class Engine:
    """A stand-in engine: ``slots`` requests at a time, in arrival order; a weight load takes
    every slot (the swap waits for the requests being served and holds up the next ones)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.version = 0
        self._free: asyncio.Semaphore | None = None  # made on the server's own event loop

    @property
    def free(self) -> asyncio.Semaphore:
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        return self._free

    async def work(self, seconds: float, slots: int = 1) -> None:
        """Take ``slots`` slots, sleep ``seconds``, give them back."""
        for _ in range(slots):
            await self.free.acquire()
        try:
            await asyncio.sleep(seconds)
        finally:
            for _ in range(slots):
                self.free.release()


def info(service: str, engine: Engine) -> dict[str, Any]:
    """``GET /info`` of a stand-in (what the trainer's start-up checks read)."""
    return {
        "service": service,
        "model": f"stand-in-{service}",
        "served_model_name": f"stand-in-{service}",
        "backend": "hf",
        "dtype": "float32",
        "device": "cpu",
        "max_model_len": 1 << 16,
        "vocab_size": 1000,
        "tokenizer_fingerprint": FINGERPRINT,
        "eos_token_ids": [0],
        "limits": {},
        "policy_version": engine.version if service == "student_rollout" else None,
        "version": "bench",
    }


def teacher_app(args: argparse.Namespace) -> FastAPI:
    """``POST /v1/score``: ``--score-s`` per request; every token scores -0.5."""
    app, engine = FastAPI(), Engine(args.slots)
    app.get("/ready")(lambda: {"status": "ready"})
    app.get("/info")(lambda: info("teacher", engine))

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        body = ScoreRequest.model_validate(await request.json())
        await engine.work(args.score_s)
        data, scored = [], 0
        for i, seq in enumerate(body.sequences):
            ids, start = seq.token_ids or [], seq.start or 0
            scored += len(ids) - start
            data.append(
                ScoreItem(
                    index=i,
                    start=start,
                    token_ids=encode_array(ids[start:], "int32", body.encoding),
                    logprobs=encode_array([-0.5] * (len(ids) - start), "float32", body.encoding),
                )
            )
        return ScoreResponse(
            model="stand-in-teacher",
            data=data,
            usage=ScoreUsage(prompt_tokens=0, scored_tokens=scored),
        ).model_dump(mode="json", exclude_none=True)

    return app


def rollout_app(args: argparse.Namespace) -> FastAPI:
    """``POST /v1/rollouts``: ``--rollout-s`` per request, ``--tokens`` tokens a sample;
    ``POST /v1/weights/load``: ``--weight-load-s``, holding every slot."""
    app, engine = FastAPI(), Engine(args.slots)
    app.get("/ready")(lambda: {"status": "ready"})
    app.get("/info")(lambda: info("student_rollout", engine))

    def status() -> dict[str, Any]:
        return WeightsStatus(
            policy_version=engine.version, loaded_at=time.time(), source="bench"
        ).model_dump()

    app.get("/v1/weights")(status)

    @app.post("/v1/weights/load", response_model=None)
    async def load(request: Request) -> dict[str, Any] | JSONResponse:
        body = WeightsLoadRequest.model_validate(await request.json())
        if body.version <= engine.version:
            message = f"version {body.version} is not newer than {engine.version}"
            return JSONResponse({"error": {"message": message, "type": "conflict"}}, 409)
        await engine.work(args.weight_load_s, slots=engine.slots)
        engine.version = body.version
        return status()

    @app.post("/v1/rollouts")
    async def rollouts(request: Request) -> dict[str, Any]:
        body = RolloutRequest.model_validate(await request.json())
        await engine.work(args.rollout_s)
        version, enc = engine.version, body.encoding
        tokens = list(range(1, args.tokens + 1))
        items = [
            RolloutItem(
                prompt_index=p,
                sample_index=k,
                prompt_token_ids=encode_array([7, 8, 9], "int32", enc),
                token_ids=encode_array(tokens, "int32", enc),
                logprobs=encode_array([-0.7] * len(tokens), "float32", enc),
                text="The answer is 4.",
                finish_reason="stop",
                policy_version=version,
            )
            for p in range(len(body.prompts))
            for k in range(body.n)
        ]
        usage = RolloutUsage(prompt_tokens=0, completion_tokens=len(items) * len(tokens))
        return RolloutResponse(
            model="stand-in-rollout", policy_version=version, data=items, usage=usage
        ).model_dump(mode="json", exclude_none=True)

    return app


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"stand-in-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the stand-in on port {port} did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------------- the trainer


def sequential_batch(
    cfg: TrainConfig,
    services: Services,
    step: int,
    examples: Sequence[Example],
    sampler_state: dict[str, Any],
    context: TeacherContext,
) -> Batch:
    """The schedule before pipelining: every rollout, then every score, then the grades."""
    timing: dict[str, float] = {}
    with timed("rollout", timing):
        rollouts = sample_rollouts(cfg, services, step, examples)
    with timed("score", timing):
        scores = score_rollouts(cfg, services.teacher, rollouts, examples, context)
    grades = grade_rollouts(rollouts, examples)
    return assemble_batch(cfg, step, examples, sampler_state, rollouts, scores, grades, timing)


def run(
    args: argparse.Namespace, urls: tuple[str, str], k: int, build: Callable[..., Batch]
) -> list[dict[str, float]]:
    """``--steps`` steps with ``max_staleness`` K: each step's metrics (timing/*, staleness)."""
    per_step = args.chunks * args.prompts_per_request
    with tempfile.TemporaryDirectory(prefix="opd-pipeline-") as tmp:
        cfg = load_config(
            None,
            [
                "student.model=stand-in",
                f"run_dir={tmp}/run",
                f"services.teacher_url={urls[0]}",
                f"services.rollout_url={urls[1]}",
                f"services.max_concurrency={args.max_concurrency}",
                f"rollout.prompts_per_step={per_step}",
                f"rollout.prompts_per_request={args.prompts_per_request}",
                f"rollout.samples_per_prompt={args.samples}",
                f"rollout.max_tokens={args.tokens}",
                # One score request per chunk: --score-s is a chunk's scoring.
                f"teacher.sequences_per_request={args.prompts_per_request * args.samples}",
                "sync.method=load",
                f"sync.shared_dir={tmp}/weights",
                f"sync.max_staleness={k}",
            ],
        )
        examples = [
            Example(index=i, question=f"Q{i}?", answer="#### 4", ground_truth="4")
            for i in range(per_step * args.steps)
        ]
        sampler = PromptSampler(examples, seed=0, shuffle=False, max_epochs=1)
        context = TeacherContext(TeacherContextConfig(), [])

        def write(directory: Path) -> None:
            (directory / WEIGHTS_FILE).write_bytes(b"stand-in weights")

        services = Services(cfg, Path(tmp) / "run")
        producer: BatchProducer | None = None
        rows: list[dict[str, float]] = []
        try:
            services.connect(None)
            services.sync.start(write)
            producer = BatchProducer(cfg, services, sampler, args.steps, 0, context, build=build)
            for step in range(1, args.steps + 1):
                metrics: dict[str, float] = {}
                with timed("step", metrics):
                    with timed("wait", metrics):
                        batch = producer.get(step)
                    assert batch is not None
                    with timed("train", metrics):
                        time.sleep(args.train_s)  # the stand-in training step
                    staleness = services.sync.version - min(batch.versions)
                    with timed("weight_sync", metrics):
                        services.sync.push(write)
                rows.append(batch.metrics | metrics | {"policy/staleness": float(staleness)})
        finally:
            if producer is not None:
                producer.close()
            services.close()
    return rows


# --------------------------------------------------------------------------------- report


def report(args: argparse.Namespace, results: list[tuple[int, str, list[dict[str, float]]]]) -> str:
    """The table: medians over the steps after the first, ratios, targets."""
    waves = math.ceil(args.chunks / args.slots)
    rollout, score, train = waves * args.rollout_s, waves * args.score_s, args.train_s
    longest, total = max(rollout, score, train), rollout + score + train
    lines = [
        "STAND-IN services (sleeping FastAPI apps): this measures the trainer's orchestration, "
        "not the engines.",
        f"per step: {args.chunks} rollout chunks x {args.prompts_per_request} prompts x "
        f"{args.samples} samples; stand-in work: rollout {rollout:.2f}s "
        f"({args.chunks} x {args.rollout_s}s, {args.slots} at a time), score {score:.2f}s, "
        f"train {train:.2f}s, weight load {args.weight_load_s}s; "
        f"max {longest:.2f}s, sum {total:.2f}s",
        f"medians over steps 2..{args.steps} (step 1 has nothing to overlap with)",
        "",
        "| K | schedule | step s | rollout_s | score_s | wait s | weight_sync s | staleness "
        "| step / max | target | step / sum | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, schedule, rows in results:
        kept = rows[1:] or rows

        def med(key: str, kept: list[dict[str, float]] = kept) -> float:
            return statistics.median(r[key] for r in kept)

        step = med("timing/step_s")
        to_max, to_sum = step / longest, step / total
        max_target = f"<= 1.10 {'ok' if to_max <= 1.1 else 'MISSED'}" if k >= 1 else ""
        sum_target = f"< 1 {'ok' if to_sum < 1 else 'MISSED'}" if k == 0 else ""
        if schedule != "pipelined":
            max_target = sum_target = "(before)"
        lines.append(
            f"| {k} | {schedule} | {step:.2f} | {med('timing/rollout_s'):.2f} "
            f"| {med('timing/score_s'):.2f} | {med('timing/wait_s'):.2f} "
            f"| {med('timing/weight_sync_s'):.2f} | {med('policy/staleness'):.0f} "
            f"| {to_max:.2f} | {max_target} | {to_sum:.2f} | {sum_target} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, start the stand-ins, run each schedule, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rollout-s", type=float, default=0.4, help="seconds per rollout request")
    p.add_argument("--score-s", type=float, default=0.4, help="seconds per score request")
    p.add_argument("--train-s", type=float, default=2.0, help="seconds per training step")
    p.add_argument("--weight-load-s", type=float, default=0.1, help="seconds per weight load")
    p.add_argument("--chunks", type=int, default=4, help="rollout requests per step")
    p.add_argument("--prompts-per-request", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--tokens", type=int, default=32, help="tokens per sample")
    p.add_argument("--slots", type=int, default=1, help="requests a stand-in serves at once")
    p.add_argument("--max-concurrency", type=int, default=8, help="services.max_concurrency")
    p.add_argument("--steps", type=int, default=5, help="steps per schedule (>= 2)")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1], help="values of K")
    p.add_argument("--sequential", action="store_true", help="also the schedule before pipelining")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is left out of the medians)")
    from trainer.batches import make_batch

    schedules: list[tuple[str, Callable[..., Batch]]] = [("pipelined", make_batch)]
    if args.sequential:
        schedules.append(("sequential", sequential_batch))
    results = []
    with serve(teacher_app(args)) as teacher, serve(rollout_app(args)) as rollout:
        for k in args.staleness:
            for name, build in schedules:
                started = time.monotonic()
                rows = run(args, (teacher, rollout), k, build)
                print(f"K={k} {name}: {time.monotonic() - started:.1f}s", file=sys.stderr)
                results.append((k, name, rows))
    print(report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
