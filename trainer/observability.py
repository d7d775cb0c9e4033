"""Where the trainer's numbers go: JSONL, TensorBoard, Prometheus, and a progress bar.

Every step's scalars (docs/design.md §6, names exactly as there) are appended as one JSON
object per line to ``RUN_DIR/metrics.jsonl`` (``{"step": N, "time": ..., "<name>": value}``),
written to TensorBoard when it is installed, and exported as Prometheus gauges on the
trainer's port: ``/`` becomes ``_`` and the name gets an ``opd_`` prefix
(``rollout/accuracy/mean`` -> ``opd_rollout_accuracy_mean``), plus ``opd_trainer_step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trainer.config import LoggingConfig

__all__ = [
    "STEP_SCALARS",
    "EVAL_SCALARS",
    "Observability",
    "ReplicaMetrics",
    "replica_metrics",
    "prometheus_name",
    "read_metrics",
    "truncate_metrics",
]

log = logging.getLogger("opd.trainer")

#: docs/design.md §6, logged every step (``eval/*`` only on evaluation steps).
STEP_SCALARS: tuple[str, ...] = (
    "rollout/accuracy/mean",
    "rollout/kl_divergence/mean",
    "rollout/jsd/mean",
    "rollout/response_length/mean",
    "rollout/truncated_frac",
    "actor/pg_loss",
    "actor/ppo_kl",
    "actor/pg_clipfrac",
    "actor/pg_clipfrac_lower",
    "actor/grad_norm",
    "actor/lr",
    "advantages/mean",
    "advantages/std",
    "eval/accuracy",
    "eval/format_rate",
    "timing/rollout_s",
    "timing/score_s",
    "timing/train_s",
    "timing/weight_sync_s",
    "timing/step_s",
    "throughput/tokens_per_s",
    "policy/version",
    "policy/staleness",
)
EVAL_SCALARS: tuple[str, ...] = ("eval/accuracy", "eval/format_rate")

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"


class ReplicaMetrics:
    """Per-replica request metrics of the trainer's service pools (:mod:`trainer.pools`),
    labelled ``pool`` (``teacher`` | ``rollout``) and ``replica`` (its base URL).

    Created once per process and unregistered: the pools record into them from the start,
    and each :class:`Observability` with a Prometheus port registers them in its registry.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ("pool", "replica")
        self.requests = Counter(
            "opd_replica_requests", "requests sent to the replica", labels, registry=None
        )
        self.errors = Counter(
            "opd_replica_errors", "requests the replica failed", labels, registry=None
        )
        self.in_flight = Gauge(
            "opd_replica_in_flight", "requests in flight at the replica", labels, registry=None
        )
        self.up = Gauge(
            "opd_replica_up", "1: the replica gets requests; 0: set aside", labels, registry=None
        )
        self.seconds = Histogram(
            "opd_replica_request_seconds",
            "request latency per replica (retries included)",
            labels,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 900),
            registry=None,
        )

    def collectors(self) -> tuple[Any, ...]:
        """The metric objects, for ``registry.register``."""
        return (self.requests, self.errors, self.in_flight, self.up, self.seconds)


_replica_metrics: ReplicaMetrics | None = None


def replica_metrics() -> ReplicaMetrics:
    """The process's :class:`ReplicaMetrics` (created on first use)."""
    global _replica_metrics
    if _replica_metrics is None:
        _replica_metrics = ReplicaMetrics()
    return _replica_metrics


def prometheus_name(key: str) -> str:
    """``rollout/accuracy/mean`` -> ``opd_rollout_accuracy_mean`` (docs/metrics.md naming)."""
    return "opd_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop records after ``max_step`` (steps a killed run did after its last checkpoint,
    which the resumed run does again), so every step appears exactly once."""
    for file in (path, path.with_name(SAMPLES_FILE), path.with_name(EVAL_SAMPLES_FILE)):
        if not file.is_file():
            continue
        kept = [r for r in read_metrics(file) if int(r.get("step", 0)) <= max_step]
        tmp = file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, file)


class Observability:
    """All sinks of one run; only rank 0 creates one (``enabled=False`` elsewhere)."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
    ) -> None:
        """Opens the sinks. Raises OSError (naming ``logging.metrics_port``) when the
        Prometheus port is taken, so a misconfigured run fails before it starts."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self._gauges: dict[str, Any] = {}
        self._tb: Any = None
        self._bar: Any = None
        self._server: Any = None
        self._last: dict[str, float] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if cfg.metrics_port:
            self._start_prometheus(cfg.metrics_host, cfg.metrics_port)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(self.run_dir / "tensorboard"), purge_step=start_step + 1
                )
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="opd", unit="step", dynamic_ncols=True
            )

    def _start_prometheus(self, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self._registry = CollectorRegistry()
        self._gauge_cls = Gauge
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self._registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve trainer metrics on {host}:{port} ({exc.strerror or exc}); set "
                "logging.metrics_port to a free port, or 0 to turn the exporter off"
            ) from exc
        self._gauge("trainer/step", "optimizer steps completed")
        for collector in replica_metrics().collectors():
            self._registry.register(collector)

    def _gauge(self, key: str, doc: str | None = None) -> Any:
        gauge = self._gauges.get(key)
        if gauge is None:
            gauge = self._gauge_cls(prometheus_name(key), doc or key, registry=self._registry)
            self._gauges[key] = gauge
        return gauge

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one step's scalars in every sink (non-finite values become null in JSON)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in clean.items()})
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._server is not None:
            for key, value in clean.items():
                self._gauge(key).set(value)
            self._gauge("trainer/step").set(step)
        self._last.update(clean)
        self._progress(step)

    def log_samples(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        """Append a few sampled responses (prompt, response, grade) to samples.jsonl."""
        if not self.enabled:
            return
        for sample in samples:
            self._samples.write(json.dumps({"step": step, **sample}) + "\n")
        self._samples.flush()

    def log_eval_samples(self, step: int, records: Iterable[Mapping[str, Any]]) -> None:
        """Append every graded evaluation answer to eval_samples.jsonl (what the numbers
        are made of: a format rate or a KL is easier to trust next to the text)."""
        if not self.enabled:
            return
        with open(self.run_dir / EVAL_SAMPLES_FILE, "a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps({"step": step, **record}) + "\n")

    def _progress(self, step: int) -> None:
        if self._bar is None:
            return
        last = self._last
        post = {
            "acc": last.get("rollout/accuracy/mean"),
            "kl": last.get("rollout/kl_divergence/mean"),
            "loss": last.get("actor/pg_loss"),
            "eval": last.get("eval/accuracy"),
            "stale": last.get("policy/staleness"),
            "s/step": last.get("timing/step_s"),
        }
        self._bar.set_postfix(
            {k: f"{v:.3g}" for k, v in post.items() if v is not None}, refresh=False
        )
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        """Flush and close every sink (the Prometheus server stops too)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._metrics.close()
        self._samples.close()
