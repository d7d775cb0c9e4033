"""The on-policy distillation loop. Start at :meth:`Trainer.run` and read down.

One step::

    prompts  = sampler.next_batch(P)                      # GSM8K train, resumable order
    samples  = POST rollout /v1/rollouts (n per prompt)   # student samples + logprobs s
    tau      = POST teacher /v1/score (prompt + sample)   # teacher logprobs of those tokens
    grades   = grade(sample, truth)                       # a metric only, never a reward
    loss     = opd_loss(log pi_theta, s, tau, mask)       # advantages, PPO/IS loss, sums
    backward over token-budget micro-batches; clip; AdamW step
    push weights to the rollout service (version + 1); log; evaluate; checkpoint

With ``sync.max_staleness = K >= 1`` the next K batches are sampled and scored in background
threads while the current one trains, so a batch may come from weights up to K versions old
(``policy/staleness``). The PPO ratio corrects for it: ``s`` is always the logprob of the
weights that actually sampled.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.protocol import InfoResponse, RolloutResponse
from trainer import distributed as D
from trainer.algorithms import LossSums, finalize_metrics
from trainer.checkpoint import (
    Checkpoint,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_hf_model,
    write_safetensors,
)
from trainer.clients import (
    RetryPolicy,
    RolloutClient,
    TeacherClient,
    WeightSync,
    map_concurrently,
    rollout_item_arrays,
)
from trainer.config import TrainConfig, dump_config
from trainer.data import Example, PromptSampler, build_messages, load_gsm8k
from trainer.eval import evaluate, measure_reverse_kl, rollout_generator
from trainer.grading import grade
from trainer.observability import METRICS_FILE, Observability, truncate_metrics
from trainer.policy import (
    PolicyModel,
    TrainSequence,
    collate,
    empty_micro_batch,
    export_state_dict,
    forward_backward,
    load_student,
    plan_micro_batches,
    resolve_device,
    torch_dtype,
)

__all__ = [
    "Batch",
    "FatalError",
    "StartupError",
    "Trainer",
    "check_services",
    "derive_seed",
    "train",
]

log = logging.getLogger("opd.trainer")


class StartupError(RuntimeError):
    """The run cannot start (services unreachable or incompatible, run dir in use, ...)."""


class FatalError(RuntimeError):
    """The run stopped; the message says why and what was saved."""


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers, e.g. ``(run seed, step, prompt index)``: the same
    request gets the same samples on every run (resume determinism)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------- services


def _same_model(expected: str, info: InfoResponse) -> bool:
    names = {info.model, info.served_model_name}
    tail = expected.rstrip("/").rsplit("/", 1)[-1]
    return expected in names or any(n.rstrip("/").rsplit("/", 1)[-1] == tail for n in names)


def check_services(
    cfg: TrainConfig,
    teacher: InfoResponse,
    rollout: InfoResponse,
    local_fingerprint: str | None = None,
    components: tuple[dict[str, str], dict[str, str]] | None = None,
) -> None:
    """Refuse to start when the two services cannot be used together (raises StartupError).

    ``components``: per-part tokenizer fingerprints of (teacher, rollout) when the services
    publish them (``tokenizer_fingerprint_components`` in /info). Then a difference in the
    chat template alone is accepted with a warning: the trainer sends the teacher token ids
    (rendered by the student's template), so the teacher's own template is never used.
    """
    if teacher.service != "teacher" or rollout.service != "student_rollout":
        raise StartupError(
            f"services.teacher_url answers as {teacher.service!r} and services.rollout_url as "
            f"{rollout.service!r}; expected 'teacher' and 'student_rollout' (URLs swapped?)"
        )
    if teacher.tokenizer_fingerprint != rollout.tokenizer_fingerprint:
        differing = None
        if components is not None:
            from services.engine import fingerprint_mismatch

            differing = fingerprint_mismatch(*components)
        if differing == ["chat_template"]:
            log.warning(
                "teacher and student tokenizers differ only in their chat templates; fine for "
                "OPD (the teacher scores token ids rendered with the student's template)"
            )
        else:
            parts = f" (differing parts: {', '.join(differing)})" if differing else ""
            raise StartupError(
                "tokenizer mismatch: the teacher serves "
                f"{teacher.model!r} (tokenizer fingerprint {teacher.tokenizer_fingerprint[:16]}...) "
                f"and the student rollout serves {rollout.model!r} (fingerprint "
                f"{rollout.tokenizer_fingerprint[:16]}...){parts}. On-policy distillation "
                "compares the teacher's and the student's logprobs of the same token ids, so "
                "both models must use the same tokenizer (vocabulary, merges, special tokens)."
            )
    if local_fingerprint is not None and local_fingerprint != rollout.tokenizer_fingerprint:
        raise StartupError(
            "tokenizer mismatch: the trainer's student tokenizer "
            f"({cfg.student.tokenizer or cfg.student.model}, fingerprint {local_fingerprint[:16]}...) "
            f"differs from the rollout service's ({rollout.model!r}, "
            f"{rollout.tokenizer_fingerprint[:16]}...); the trainer must compute logprobs of "
            "exactly the token ids the rollout service samples."
        )
    if cfg.teacher.model and not _same_model(cfg.teacher.model, teacher):
        raise StartupError(
            f"teacher.model is {cfg.teacher.model!r} but the teacher service serves "
            f"{teacher.model!r} (served as {teacher.served_model_name!r}); point "
            "services.teacher_url at the right service, or set teacher.model to null to skip "
            "this check"
        )
    for name, info in (("teacher", teacher), ("rollout", rollout)):
        if info.max_model_len < cfg.trainer.max_model_len:
            raise StartupError(
                f"the {name} service's max_model_len is {info.max_model_len}, below "
                f"trainer.max_model_len {cfg.trainer.max_model_len}: long samples would be "
                f"refused. Start it with --max-model-len {cfg.trainer.max_model_len} or lower "
                "trainer.max_model_len"
            )


class Services:
    """Rank 0's connections: the teacher, the rollout service, and the weight sync."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        s = cfg.services
        api_key = os.environ.get(s.api_key_env) or None
        retry = RetryPolicy(
            max_attempts=s.max_attempts,
            deadline_s=s.retry_timeout_s,
            initial_s=s.backoff_initial_s,
            max_s=s.backoff_max_s,
        )
        common: dict[str, Any] = {
            "api_key": api_key,
            "timeout_s": s.request_timeout_s,
            "retry": retry,
            "max_connections": s.max_concurrency,
        }
        self.cfg = cfg
        self.teacher = TeacherClient("teacher", s.teacher_url, **common)
        self.rollout = RolloutClient("rollout", s.rollout_url, **common)
        self.sync = WeightSync(
            self.rollout,
            method=cfg.sync.method,
            staging_dir=run_dir / "weights",
            shared_dir=Path(cfg.sync.shared_dir) if cfg.sync.shared_dir else None,
            service_dir=cfg.sync.service_dir,
        )

    def connect(self, local_fingerprint: str | None) -> tuple[InfoResponse, InfoResponse]:
        """Wait for both services (with backoff, up to ``services.ready_timeout_s``) and
        check they fit together."""
        deadline = time.monotonic() + self.cfg.services.ready_timeout_s
        teacher = self.teacher.wait_ready(self.cfg.services.ready_timeout_s)
        rollout = self.rollout.wait_ready(max(1.0, deadline - time.monotonic()))
        key = "tokenizer_fingerprint_components"
        t_parts, r_parts = self.teacher.info_raw.get(key), self.rollout.info_raw.get(key)
        components = (
            (t_parts, r_parts) if isinstance(t_parts, dict) and isinstance(r_parts, dict) else None
        )
        check_services(self.cfg, teacher, rollout, local_fingerprint, components)
        return teacher, rollout

    def rollouts(
        self,
        prompts: Sequence[dict[str, Any]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> RolloutResponse:
        """``/v1/rollouts`` that notices a restarted rollout service.

        A restarted service serves its initial weights at version 0: the answer's
        ``policy_version`` is then below what was confirmed before the request was sent.
        The current weights are pushed again and the request repeated.
        """
        for _ in range(3):
            expected = self.sync.version
            resp = self.rollout.rollouts(
                prompts, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed
            )
            served = min((it.policy_version for it in resp.data), default=resp.policy_version)
            if not self.sync.restore(served, expected):
                return resp
        raise FatalError("the rollout service keeps losing its weights (restarting in a loop?)")

    def close(self) -> None:
        """Close the HTTP clients."""
        self.teacher.close()
        self.rollout.close()


# --------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One step's training data, plus what the metrics need."""

    step: int
    sequences: list[TrainSequence]
    sampler_state: dict[str, Any]  # sampler position before this batch was drawn
    versions: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few, for samples.jsonl


def make_batch(
    cfg: TrainConfig,
    services: Services,
    step: int,
    examples: Sequence[Example],
    sampler_state: dict[str, Any],
) -> Batch:
    """Sample, score and grade one step's prompts (rank 0; may run in a background thread)."""
    r = cfg.rollout
    t0 = time.monotonic()
    # One request per `prompts_per_request` prompts, each with a seed fixed by (seed, step,
    # first prompt): the same step samples the same tokens in a resumed run.
    starts = list(range(0, len(examples), r.prompts_per_request))

    def sample(start: int) -> list[tuple[int, Any]]:
        chunk = examples[start : start + r.prompts_per_request]
        resp = services.rollouts(
            [{"messages": build_messages(ex.question)} for ex in chunk],
            n=r.samples_per_prompt,
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            seed=derive_seed(cfg.seed, step, start),
        )
        return [(start + it.prompt_index, it) for it in resp.data]

    items = [
        x for part in map_concurrently(sample, starts, cfg.services.max_concurrency) for x in part
    ]
    items.sort(key=lambda x: (x[0], x[1].sample_index))
    arrays = [rollout_item_arrays(it) for _, it in items]
    t1 = time.monotonic()

    tau = services.teacher.score(
        [a[0] for a in arrays],
        [a[1] for a in arrays],
        temperature=cfg.teacher_temperature,
        sequences_per_request=cfg.teacher.sequences_per_request,
        max_concurrency=cfg.services.max_concurrency,
    )
    t2 = time.monotonic()

    sequences, correct, formatted, truncated, empty, nonfinite = [], [], [], [], [], 0
    samples: list[dict[str, Any]] = []
    for (prompt_index, item), (p_ids, r_ids, s), t in zip(items, arrays, tau, strict=True):
        g = grade(item.text, examples[prompt_index].ground_truth)
        correct.append(g.correct)
        formatted.append(g.has_answer)
        is_truncated = item.finish_reason == "length"
        truncated.append(is_truncated)
        empty.append(len(r_ids) == 0)
        finite = bool(np.isfinite(s).all() and np.isfinite(t).all())
        nonfinite += not finite
        trainable = len(r_ids) > 0 and finite and not (r.mask_truncated and is_truncated)
        sequences.append(TrainSequence(p_ids, r_ids, s, t, trainable=trainable))
        if len(samples) < cfg.logging.samples_per_step and item.sample_index == 0:
            samples.append(
                {
                    "prompt_index": prompt_index,
                    "question": examples[prompt_index].question,
                    "ground_truth": examples[prompt_index].ground_truth,
                    "response": item.text,
                    "correct": g.correct,
                    "finish_reason": item.finish_reason,
                    "policy_version": item.policy_version,
                }
            )
    lengths = [len(a[1]) for a in arrays]
    n = max(len(items), 1)
    metrics = {
        "rollout/accuracy/mean": sum(correct) / n,
        "rollout/format_rate": sum(formatted) / n,
        "rollout/response_length/mean": sum(lengths) / n,
        "rollout/response_length/max": float(max(lengths, default=0)),
        "rollout/prompt_length/mean": sum(len(a[0]) for a in arrays) / n,
        "rollout/truncated_frac": sum(truncated) / n,
        "rollout/empty_frac": sum(empty) / n,
        "rollout/nonfinite_frac": nonfinite / n,
        "rollout/num_prompts": float(len(examples)),
        "rollout/num_samples": float(len(items)),
        "timing/rollout_s": t1 - t0,
        "timing/score_s": t2 - t1,
    }
    if nonfinite:
        log.warning(
            "step %d: %d sample(s) with non-finite logprobs left out of the loss", step, nonfinite
        )
    return Batch(
        step=step,
        sequences=sequences,
        sampler_state=sampler_state,
        versions=[it.policy_version for _, it in items],
        metrics=metrics,
        samples=samples,
    )


def _in_thread(fn: Callable[[], Batch]) -> Future[Batch]:
    """Run ``fn`` on a daemon thread (a stuck HTTP call must not block interpreter exit)."""
    future: Future[Batch] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the consumer, re-raised by .result()
            future.set_exception(exc)

    threading.Thread(target=target, name="opd-batch-producer", daemon=True).start()
    return future


class BatchProducer:
    """Hands out step ``t``'s batch; with ``max_staleness = K``, keeps K more in flight.

    Prompts are drawn in the caller's thread when a batch is *requested*, so the data order
    never depends on timing; the sampler position before each draw travels with the batch
    and is what a checkpoint stores (:meth:`next_sampler_state`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        services: Services,
        sampler: PromptSampler,
        last_step: int,
        start_step: int,
    ):
        self.cfg = cfg
        self.services = services
        self.sampler = sampler
        self.last_step = last_step
        self._next = start_step + 1
        self._queue: deque[tuple[int, dict[str, Any], Future[Batch] | Callable[[], Batch]]] = (
            deque()
        )

    def _request(self) -> bool:
        step = self._next
        if step > self.last_step or self.sampler.exhausted:
            return False
        state = self.sampler.state_dict()
        examples = self.sampler.next_batch(self.cfg.rollout.prompts_per_step)

        def job() -> Batch:
            return make_batch(self.cfg, self.services, step, examples, state)

        async_ = self.cfg.sync.max_staleness > 0
        self._queue.append((step, state, _in_thread(job) if async_ else job))
        self._next += 1
        return True

    def get(self, step: int) -> Batch | None:
        """The batch of ``step`` (None when the data ran out)."""
        while len(self._queue) < self.cfg.sync.max_staleness + 1 and self._request():
            pass
        if not self._queue:
            return None
        queued_step, _, job = self._queue.popleft()
        assert queued_step == step, (queued_step, step)
        return job.result() if isinstance(job, Future) else job()

    def next_sampler_state(self) -> dict[str, Any]:
        """Where the data order continues after the last handed-out batch."""
        return self._queue[0][1] if self._queue else self.sampler.state_dict()

    def close(self) -> None:
        """Forget queued batches (their threads are daemons)."""
        for _, _, job in self._queue:
            if isinstance(job, Future):
                job.cancel()
        self._queue.clear()


# --------------------------------------------------------------------------------- trainer


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    t = cfg.trainer

    def factor(done: int) -> float:
        if t.warmup_steps and done < t.warmup_steps:
            return (done + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - t.warmup_steps)
        progress = min(1.0, (done - t.warmup_steps) / span)
        if t.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _sync_dtype(cfg: TrainConfig, causal_lm: torch.nn.Module) -> torch.dtype:
    """The dtype pushed weights (and config.json) use: the student checkpoint's own."""
    if cfg.sync.dtype != "auto":
        return torch_dtype(cfg.sync.dtype)
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained(
        cfg.student.model, trust_remote_code=cfg.student.trust_remote_code
    )
    saved = getattr(original, "dtype", None) or getattr(original, "torch_dtype", None)
    if isinstance(saved, torch.dtype):
        return saved
    return torch_dtype(saved) if saved else torch.float32


class _Abort:
    """Broadcast by rank 0 instead of a batch when it hit an error (other ranks stop too)."""

    def __init__(self, message: str) -> None:
        self.message = message


class Trainer:
    """One OPD run. ``Trainer(cfg).run()``; ``resume=True`` continues ``cfg.run_dir``."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(cfg.student.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.ctx = D.init_distributed(self.device)
        self.services: Services | None = None
        self.obs: Observability | None = None
        self.producer: BatchProducer | None = None
        self.step = 0
        self._saved_step = -1
        self._consistent = True  # False only while the optimizer is changing the weights
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self, resume: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        ckpt = self._find_checkpoint(resume)

        # Services first: an unreachable or incompatible service should fail in seconds,
        # before minutes of model loading.
        self._on_main(lambda: self._connect(ckpt), "connecting to the services")

        torch.manual_seed(cfg.seed)
        model_path = str(ckpt.model_dir) if ckpt else cfg.student.model
        causal_lm, self.tokenizer = load_student(
            cfg.student.model_copy(
                update={
                    "model": model_path,
                    "tokenizer": model_path if ckpt else cfg.student.tokenizer,
                }
            ),
            self.device,
        )
        self.causal_lm = causal_lm
        self.sync_dtype = _sync_dtype(cfg, causal_lm)
        self.master_dtype = torch_dtype(cfg.student.dtype)
        self.autocast_dtype = (
            torch_dtype(cfg.student.autocast_dtype) if cfg.student.autocast_dtype else None
        )
        self.policy = PolicyModel(causal_lm, cfg.student.logprob_chunk_tokens)
        D.shard_policy(self.policy, ctx)
        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay
        )

        # Data (rank 0 samples; the others only need the step count).
        self.sampler, self.eval_examples, self.total_steps = self._load_data()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg, self.total_steps)
        )
        if ckpt is not None:
            self._restore(ckpt)

        # The rollout service must sample from exactly these weights: push them now (a new
        # version above anything it served, so stale samples can never pass as current).
        self._push_weights(
            initial=True, min_version=int(ckpt.state["policy_version"]) if ckpt else 0
        )

        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            assert self.services is not None and self.sampler is not None
            self.producer = BatchProducer(
                cfg, self.services, self.sampler, self.total_steps, self.step
            )
        self.obs = Observability(
            self.run_dir,
            cfg.logging,
            total_steps=self.total_steps,
            start_step=self.step,
            enabled=ctx.is_main,
        )

    def _find_checkpoint(self, resume: bool) -> Checkpoint | None:
        existing = list_checkpoints(self.run_dir)
        if not resume:
            if existing:
                raise StartupError(
                    f"{self.run_dir} already holds checkpoints (latest step {existing[-1][0]}); "
                    f"continue it with `opd train --resume {self.run_dir}` or set another run_dir"
                )
            return None
        if not existing:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", self.run_dir)
            return None
        return load_checkpoint(self.run_dir)

    def _connect(self, ckpt: Checkpoint | None) -> None:
        from transformers import AutoTokenizer

        from services.engine import tokenizer_fingerprint

        tok_path = (
            str(ckpt.model_dir) if ckpt else (self.cfg.student.tokenizer or self.cfg.student.model)
        )
        local = tokenizer_fingerprint(
            AutoTokenizer.from_pretrained(
                tok_path, trust_remote_code=self.cfg.student.trust_remote_code
            )
        )
        self.services = Services(self.cfg, self.run_dir)
        teacher, rollout = self.services.connect(local)
        log.info(
            "teacher %s (%s, %s) and rollout %s (%s, policy_version %s) ready; tokenizers match",
            teacher.model,
            teacher.backend,
            teacher.device,
            rollout.model,
            rollout.backend,
            rollout.policy_version,
        )

    def _on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on rank 0; every rank raises if it failed (no rank is left waiting)."""
        result: Any = None
        error: BaseException | None = None
        if self.ctx.is_main:
            try:
                result = fn()
            except BaseException as exc:
                error = exc
        status = D.broadcast_object(None if error is None else _Abort(f"{what}: {error}"), self.ctx)
        if error is not None:
            raise error
        if isinstance(status, _Abort):
            raise FatalError(f"rank 0 failed while {status.message}")
        return result

    def _load_data(self) -> tuple[PromptSampler | None, list[Example], int]:
        cfg = self.cfg
        train = load_gsm8k("train", cfg.data.source, limit=cfg.data.train_limit)
        limit = cfg.trainer.max_model_len - cfg.rollout.max_tokens
        fits = [ex for ex in train if self._prompt_len(ex) <= limit]
        if len(fits) < len(train):
            log.warning(
                "dropped %d training prompts longer than %d tokens", len(train) - len(fits), limit
            )
        if not fits:
            raise StartupError(
                f"no training prompt fits in {limit} tokens (max_model_len - max_tokens)"
            )
        steps = math.ceil(len(fits) * cfg.trainer.epochs / cfg.rollout.prompts_per_step)
        if cfg.trainer.total_steps is not None:
            steps = min(steps, cfg.trainer.total_steps)
        sampler = PromptSampler(
            fits, seed=cfg.seed, shuffle=cfg.data.shuffle, max_epochs=cfg.trainer.epochs
        )
        evals = (
            load_gsm8k("test", cfg.data.source, limit=cfg.eval.limit) if self.ctx.is_main else []
        )
        return sampler, evals, steps

    def _prompt_len(self, ex: Example) -> int:
        ids = self.tokenizer.apply_chat_template(
            build_messages(ex.question), add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return len(ids)

    def _restore(self, ckpt: Checkpoint) -> None:
        self.step = ckpt.step
        self._saved_step = ckpt.step
        opt = ckpt.optimizer_state() if self.ctx.is_main else None
        has_opt = D.broadcast_object(opt is not None, self.ctx)
        if has_opt:
            D.load_optimizer_state(
                self.policy, self.optimizer, opt["optimizer"] if opt else None, self.ctx
            )
            self.scheduler.load_state_dict(
                D.broadcast_object(opt["scheduler"] if opt else None, self.ctx)
            )
        else:
            log.warning(
                "checkpoint %s has no optimizer state: AdamW restarts from zero moments", ckpt.path
            )
            self.scheduler.last_epoch = ckpt.step
        if self.sampler is not None:
            self.sampler.load_state_dict(ckpt.state["sampler"])
        rng = ckpt.rng_states()
        if len(rng) == self.ctx.world_size:
            restore_rng(rng[self.ctx.rank])
        log.info("resumed from %s at step %d", ckpt.path, self.step)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Train to the end (or until the data runs out); evaluate and checkpoint on the way."""
        cfg = self.cfg
        try:
            if self.step == 0 and cfg.eval.at_start:
                self._log(0, self.evaluate())
            while self.step < self.total_steps:
                start = time.monotonic()
                batch = self._next_batch(self.step + 1)  # sampled, scored, graded (rank 0)
                if batch is None:
                    break
                waited = time.monotonic() - start
                metrics = self.train_step(batch)  # forward/backward, clip, AdamW; step += 1
                metrics["timing/weight_sync_s"] = self._push_weights()
                metrics.update(self._step_timing(start, waited, batch))
                if self._due(cfg.eval.interval, cfg.eval.at_end):
                    metrics.update(self.evaluate())
                self._log(self.step, metrics, batch)
                if self._due(cfg.checkpoint.interval, cfg.checkpoint.at_end):
                    self.save()
        except BaseException as exc:
            self._fail(exc)
            raise
        if self.step < self.total_steps and cfg.checkpoint.at_end:
            self.save()  # the data ran out early

    def _due(self, interval: int, at_end: bool) -> bool:
        """Whether something done every ``interval`` steps (and maybe at the end) is due now."""
        return bool(interval and self.step % interval == 0) or (
            at_end and self.step == self.total_steps
        )

    @staticmethod
    def _step_timing(start: float, waited: float, batch: Batch) -> dict[str, float]:
        step_s = time.monotonic() - start
        response_tokens = sum(len(s.response_ids) for s in batch.sequences)
        return {
            "timing/wait_s": waited,
            "timing/step_s": step_s,
            "throughput/tokens_per_s": response_tokens / max(step_s, 1e-9),
        }

    def _next_batch(self, step: int) -> Batch | None:
        """Rank 0 produces the batch; every rank gets it (or the reason rank 0 stopped)."""
        payload: Any = None
        error: BaseException | None = None
        if self.ctx.is_main:
            assert self.producer is not None
            try:
                payload = self.producer.get(step)
            except BaseException as exc:
                error = exc
                payload = _Abort(f"{type(exc).__name__}: {exc}")
        payload = D.broadcast_object(payload, self.ctx)
        if error is not None:
            raise error
        if isinstance(payload, _Abort):
            raise FatalError(f"rank 0 stopped: {payload.message}")
        return payload

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on ``batch`` (every rank); returns the step's metrics."""
        cfg, ctx = self.cfg, self.ctx
        t0 = time.monotonic()
        seqs = [s for s in batch.sequences if s.trainable]
        total_tokens = sum(len(s.response_ids) for s in seqs)
        plan = plan_micro_batches([s.length for s in seqs], cfg.trainer.micro_batch_tokens)
        # Under FSDP every rank must run the same number of forward/backward passes.
        per_rank = math.ceil(len(plan) / ctx.world_size)
        mine = plan[ctx.rank :: ctx.world_size]
        micro_batches = [collate([seqs[i] for i in idx], self.device) for idx in mine]
        micro_batches += [empty_micro_batch(self.device)] * (per_rank - len(mine))

        self.optimizer.zero_grad(set_to_none=True)
        sums = forward_backward(
            self.policy,
            micro_batches,
            cfg.algorithm,
            temperature=cfg.rollout.temperature,
            total_tokens=float(total_tokens),
            total_seqs=float(len(seqs)),
            loss_scale=float(ctx.world_size),  # FSDP averages gradients over ranks; we want sums
            backend=cfg.trainer.loss_backend,
            autocast_dtype=self.autocast_dtype,
        )
        vec = (
            sums.as_tensor()
            if sums is not None
            else torch.zeros(len(LossSums.field_names()), device=self.device)
        )
        sums = LossSums.from_tensor(D.all_reduce_sum(vec.to(self.device), ctx))

        lr = self.scheduler.get_last_lr()[0]
        max_norm = cfg.trainer.grad_clip if cfg.trainer.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        grad_norm = float(
            grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        )
        if total_tokens > 0 and math.isfinite(grad_norm):
            self._consistent = False
            self.optimizer.step()
            self.scheduler.step()
            self._consistent = True
        else:
            # Nothing to learn from (all empty) or a non-finite gradient: skip the update
            # rather than poison the weights; the step still counts (data order is fixed).
            log.warning(
                "step %d: skipped the optimizer update (tokens=%d, grad_norm=%s)",
                batch.step,
                total_tokens,
                grad_norm,
            )
        self.step = batch.step

        metrics = dict(batch.metrics)
        metrics.update(finalize_metrics(sums))
        metrics.update(
            {
                "actor/grad_norm": grad_norm,
                "actor/lr": lr,
                "timing/train_s": time.monotonic() - t0,
                "train/micro_batches": float(len(plan)),
                "train/tokens": float(total_tokens),
                "train/sequences": float(len(seqs)),
            }
        )
        if batch.versions and self.services is not None:
            # Staleness: optimizer steps between the weights that sampled and those trained.
            metrics["policy/version"] = float(self.services.sync.version)
            metrics["policy/staleness"] = float(self.services.sync.version - min(batch.versions))
            metrics["policy/sample_version/min"] = float(min(batch.versions))
        return metrics

    # ------------------------------------------------------------------ weights, eval, saving

    def _gather_state(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """Full CPU state dict in ``dtype`` on rank 0 (collective under FSDP)."""
        state = D.full_state_dict(self.policy, self.ctx)
        if state is None:
            return None
        return export_state_dict(state, self.causal_lm, dtype)

    def _push_weights(self, *, initial: bool = False, min_version: int = 0) -> float:
        """Send the current weights to the rollout service; returns the seconds it took."""
        start = time.monotonic()
        state = self._gather_state(self.sync_dtype)

        def push() -> int:
            assert self.services is not None and state is not None

            def write(directory: Path) -> None:
                write_safetensors(state, directory)

            if initial:
                return self.services.sync.start(write, min_version)
            return self.services.sync.push(write)

        version = self._on_main(push, "pushing weights to the rollout service")
        if initial and self.ctx.is_main:
            log.info(
                "rollout service now serves the trainer's weights as policy_version %d", version
            )
        return time.monotonic() - start

    def evaluate(self) -> dict[str, float]:
        """Greedy GSM8K test accuracy (and optionally reverse KL) of the served weights."""
        cfg = self.cfg

        def run_eval() -> dict[str, float]:
            assert self.services is not None
            start = time.monotonic()
            result = evaluate(
                rollout_generator(
                    self.services.rollouts,
                    prompts_per_request=cfg.eval.prompts_per_request,
                    max_concurrency=cfg.services.max_concurrency,
                ),
                self.eval_examples,
                cfg.eval.max_tokens,
            )
            metrics = result.metrics()
            if self.obs is not None:
                self.obs.log_eval_samples(self.step, result.records)
            if cfg.eval.kl_prompts:
                metrics["eval/reverse_kl"] = measure_reverse_kl(
                    self.services.rollouts,
                    self.services.teacher,
                    self.eval_examples[: cfg.eval.kl_prompts],
                    samples_per_prompt=cfg.eval.kl_samples_per_prompt,
                    max_tokens=cfg.rollout.max_tokens,
                    temperature=cfg.rollout.temperature,
                    teacher_temperature=cfg.teacher_temperature,
                    seed=derive_seed(cfg.seed, -1),
                )
            metrics["timing/eval_s"] = time.monotonic() - start
            return metrics

        return self._on_main(run_eval, "evaluating") or {}

    def save(self) -> Path | None:
        """Checkpoint the current step (collective; rank 0 writes). Returns the directory."""
        start = time.monotonic()
        cfg, ctx = self.cfg, self.ctx
        state = self._gather_state(self.master_dtype)
        optim = (
            D.optimizer_state(self.policy, self.optimizer, ctx)
            if cfg.checkpoint.save_optimizer
            else None
        )
        rng = D.gather_objects(capture_rng(), ctx)
        path: Path | None = None
        if ctx.is_main:
            assert (
                state is not None
                and rng is not None
                and self.services is not None
                and self.producer is not None
            )
            path = save_checkpoint(
                self.run_dir,
                self.step,
                write_model=lambda d: write_hf_model(
                    d,
                    state,
                    self.causal_lm.config,
                    self.tokenizer,
                    serve_dtype=self.sync_dtype,
                    generation_config=getattr(self.causal_lm, "generation_config", None),
                ),
                trainer_state={
                    "policy_version": self.services.sync.version,
                    "sampler": self.producer.next_sampler_state(),
                    "config": cfg.model_dump(mode="json"),
                    "world_size": ctx.world_size,
                    "total_steps": self.total_steps,
                },
                optimizer_state=None
                if optim is None
                else {"optimizer": optim, "scheduler": self.scheduler.state_dict()},
                rng_states=rng,
                keep_last=cfg.checkpoint.keep_last,
            )
            if self.obs is not None:
                self.obs.write(
                    f"checkpoint step {self.step} -> {path} ({time.monotonic() - start:.1f}s)"
                )
        D.barrier(ctx)
        self._saved_step = self.step
        return path

    def _log(self, step: int, metrics: dict[str, float], batch: Batch | None = None) -> None:
        if self.obs is None or not self.ctx.is_main:
            return
        self.obs.log(step, metrics)
        if batch is not None:
            self.obs.log_samples(step, batch.samples)

    def _fail(self, exc: BaseException) -> None:
        """Save what can be saved, then let the error go up with a clear message."""
        if isinstance(exc, KeyboardInterrupt):
            log.warning("interrupted at step %d", self.step)
        else:
            log.error("training stopped at step %d: %s: %s", self.step, type(exc).__name__, exc)
        if self._consistent and self.step > self._saved_step and self.step > 0:
            try:
                path = self.save()
                log.error(
                    "saved checkpoint %s; continue with `opd train --resume %s`", path, self.run_dir
                )
            except BaseException as save_exc:  # the original error matters more
                log.error("could not save a checkpoint after the failure: %s", save_exc)
        elif self._saved_step >= 0:
            log.error("last checkpoint: step %d (in %s)", self._saved_step, self.run_dir)

    def close(self) -> None:
        """Stop background work, close sinks and connections, leave the process group."""
        if self.producer is not None:
            self.producer.close()
        if self.obs is not None:
            self.obs.close()
        if self.services is not None:
            self.services.close()
        D.shutdown(self.ctx)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or resume) one training run; returns the run directory.

    Raises:
        StartupError: anything that went wrong before the first step (nothing to save).
    """
    try:
        trainer = Trainer(cfg, resume=resume)
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(f"{type(exc).__name__}: {exc}") from exc
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer.run_dir
