"""The on-policy distillation loop. Start at :meth:`Trainer.run` and read down.

One step::

    batch = next batch               # prompts -> POST /v1/rollouts (samples, their logprobs s)
                                     #   -> POST /v1/score (teacher logprobs tau) -> grades
    accumulate_gradients(batch)      # opd_loss(log pi_theta, s, tau, mask) per micro-batch
    apply_gradients()                # clip the gradient norm; AdamW and LR-schedule step
    push weights to the rollout service (version + 1); log; evaluate; checkpoint

Grades are metrics, never rewards. With ``sync.max_staleness = K >= 1`` the next K batches
are sampled and scored in background threads while the current one trains, so a batch may
come from weights up to K versions old (``policy/staleness``). The PPO ratio corrects for it:
``s`` is always the logprob of the weights that actually sampled.

Each piece has its module: :mod:`trainer.batches` (sampling, scoring),
:mod:`trainer.producer` (running ahead), :mod:`trainer.optimization` (gradients and the
update), :mod:`trainer.student_state` (the model: load, gather, save), :mod:`trainer.startup`
(resume point, prompts) and :mod:`trainer.connections` (the services).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from trainer import distributed as D
from trainer.batches import Batch, derive_seed
from trainer.checkpoint import write_safetensors
from trainer.config import TrainConfig, dump_config
from trainer.connections import Services, connect_services
from trainer.errors import StartupError
from trainer.eval import evaluate, measure_reverse_kl, rollout_generator
from trainer.observability import METRICS_FILE, Observability, truncate_metrics
from trainer.optimization import accumulate_gradients, apply_gradients, make_scheduler
from trainer.policy import resolve_device
from trainer.producer import BatchProducer
from trainer.startup import find_checkpoint, load_prompts, student_tokenizer_path
from trainer.student_state import gather_state, load_trainable_student, restore, save_student
from trainer.timing import timed

__all__ = ["Trainer", "train"]

log = logging.getLogger("opd.trainer")


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

    def _setup(self, resume: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        ckpt = find_checkpoint(self.run_dir, resume)
        self.services = D.on_main(
            lambda: connect_services(cfg, self.run_dir, student_tokenizer_path(cfg, ckpt)),
            ctx,
            "connecting to the services",
        )
        self.student = load_trainable_student(cfg, ckpt, self.device, ctx)
        prompts = load_prompts(cfg, self.student.tokenizer, ctx.is_main)
        sampler, self.eval_examples, self.total_steps = (
            prompts.sampler,
            prompts.evals,
            prompts.total_steps,
        )
        self.teacher_context = prompts.teacher_context
        self.scheduler = make_scheduler(self.student.optimizer, cfg.trainer, self.total_steps)
        if ckpt is not None:
            restore(ckpt, self.student, self.scheduler, sampler, ctx)
            self.step = self._saved_step = ckpt.step
        # The rollout service must sample from exactly these weights: push them now (a new
        # version above anything it served, so stale samples can never pass as current).
        self._push_weights(min_version=int(ckpt.state["policy_version"]) if ckpt else 0)
        if ctx.is_main:
            assert self.services is not None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
            self.producer = BatchProducer(
                cfg, self.services, sampler, self.total_steps, self.step, self.teacher_context
            )
        self.obs = Observability(
            self.run_dir,
            cfg.logging,
            total_steps=self.total_steps,
            start_step=self.step,
            enabled=ctx.is_main,
        )

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Train to the end (or until the data runs out); evaluate and checkpoint on the way."""
        cfg = self.cfg
        try:
            if self.step == 0 and cfg.eval.at_start:
                self._log(0, self.evaluate())
            while self.step < self.total_steps:
                metrics: dict[str, float] = {}
                with timed("step", metrics):
                    with timed("wait", metrics):
                        batch = self._next_batch(self.step + 1)  # sampled, scored, graded
                    if batch is None:
                        break
                    metrics |= self.train_step(batch)  # forward/backward, AdamW; step += 1
                    with timed("weight_sync", metrics):
                        self._push_weights()
                tokens_per_s = batch.response_tokens / max(metrics["timing/step_s"], 1e-9)
                metrics["throughput/tokens_per_s"] = tokens_per_s
                if self._due(cfg.eval.interval, cfg.eval.at_end):
                    metrics |= self.evaluate()
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

    def _next_batch(self, step: int) -> Batch | None:
        """Rank 0 produces the batch; every rank gets it (or the reason rank 0 stopped)."""

        def produce() -> Batch | None:
            assert self.producer is not None
            return self.producer.get(step)

        return D.on_main(produce, self.ctx, f"producing the batch of step {step}", share=True)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on ``batch`` (every rank); returns the step's metrics."""
        cfg, s = self.cfg, self.student
        seqs = [x for x in batch.sequences if x.trainable]
        metrics = dict(batch.metrics)
        with timed("train", metrics):
            _, loss_metrics = accumulate_gradients(
                s.policy,
                seqs,
                cfg.algorithm,
                self.ctx,
                self.device,
                micro_batch_tokens=cfg.trainer.micro_batch_tokens,
                temperature=cfg.rollout.temperature,
                backend=cfg.trainer.loss_backend,
                autocast_dtype=s.autocast_dtype,
            )
            self._consistent = False
            update_metrics = apply_gradients(
                s.policy,
                s.optimizer,
                self.scheduler,
                grad_clip=cfg.trainer.grad_clip,
                tokens=int(loss_metrics["train/tokens"]),
                step=batch.step,
            )
            self._consistent = True
        self.step = batch.step
        metrics |= loss_metrics | update_metrics
        if batch.versions and self.services is not None:
            # Staleness: optimizer steps between the weights that sampled and those trained.
            version = self.services.sync.version
            metrics["policy/version"] = float(version)
            metrics["policy/staleness"] = float(version - min(batch.versions))
            metrics["policy/sample_version/min"] = float(min(batch.versions))
        return metrics

    # ------------------------------------------------------------------ weights, eval, saving

    def _push_weights(self, *, min_version: int | None = None) -> None:
        """Send the current weights to the rollout service as the next version. With
        ``min_version`` (the first push) the version is also above ``min_version`` and
        above anything the service served."""
        state = gather_state(self.student, self.ctx, self.student.sync_dtype)

        def write(directory: Path) -> None:
            assert state is not None
            write_safetensors(state, directory)

        def push() -> int:
            assert self.services is not None
            sync = self.services.sync
            if min_version is None:
                return sync.push(write, state)
            return sync.start(write, min_version)

        version = D.on_main(push, self.ctx, "pushing weights to the rollout service")
        if min_version is not None and self.ctx.is_main:
            log.info(
                "rollout service now serves the trainer's weights as policy_version %d", version
            )

    def evaluate(self) -> dict[str, float]:
        """Greedy GSM8K test accuracy (and optionally reverse KL) of the served weights."""
        return D.on_main(self._evaluate_on_main, self.ctx, "evaluating") or {}

    def _evaluate_on_main(self) -> dict[str, float]:
        cfg, services = self.cfg, self.services
        assert services is not None
        metrics: dict[str, float] = {}
        with timed("eval", metrics):
            generate = rollout_generator(
                services.rollouts,
                prompts_per_request=cfg.eval.prompts_per_request,
                max_concurrency=cfg.services.max_concurrency,
            )
            examples = self.eval_examples
            if cfg.eval.interval_limit and 0 < self.step < self.total_steps:
                examples = examples[: cfg.eval.interval_limit]  # between start and end
            result = evaluate(generate, examples, cfg.eval.max_tokens)
            metrics |= result.metrics()
            if self.obs is not None:
                self.obs.log_eval_samples(self.step, result.records)
            if cfg.eval.kl_prompts:
                kl = measure_reverse_kl(
                    services.rollouts,
                    services.teacher,
                    self.eval_examples[: cfg.eval.kl_prompts],
                    samples_per_prompt=cfg.eval.kl_samples_per_prompt,
                    max_tokens=cfg.rollout.max_tokens,
                    temperature=cfg.rollout.temperature,
                    teacher_temperature=cfg.teacher_temperature,
                    teacher_context=self.teacher_context,
                    seed=derive_seed(cfg.seed, -1),
                )
                metrics |= kl.metrics()
        return metrics

    def save(self) -> Path | None:
        """Checkpoint the current step (collective; rank 0 writes). Returns the directory."""

        def trainer_state() -> dict[str, Any]:
            assert self.services is not None and self.producer is not None
            return {
                "policy_version": self.services.sync.version,
                "sampler": self.producer.next_sampler_state(),
                "config": self.cfg.model_dump(mode="json"),
                "world_size": self.ctx.world_size,
                "total_steps": self.total_steps,
            }

        timing: dict[str, float] = {}
        with timed("checkpoint", timing):
            path = save_student(
                self.cfg, self.student, self.scheduler, self.ctx, self.step, trainer_state
            )
        if path is not None and self.obs is not None:
            seconds = timing["timing/checkpoint_s"]
            self.obs.write(f"checkpoint step {self.step} -> {path} ({seconds:.1f}s)")
        D.barrier(self.ctx)
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
        # Like Observability.close in shape only: each closes its own parts.
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
