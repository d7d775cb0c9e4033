"""Metrics sinks (JSONL, TensorBoard, Prometheus names per docs/metrics.md) and `opd plot`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from services.launch import free_port
from trainer.config import LoggingConfig
from trainer.observability import STEP_SCALARS, Observability, prometheus_name, read_metrics
from trainer.plots import main as plot_main


def test_prometheus_names_follow_team_notes() -> None:
    assert prometheus_name("rollout/accuracy/mean") == "opd_rollout_accuracy_mean"
    assert prometheus_name("timing/step_s") == "opd_timing_step_s"
    assert prometheus_name("policy/staleness") == "opd_policy_staleness"
    assert len(STEP_SCALARS) == 23


def test_sinks_write_jsonl_tensorboard_and_serve_gauges(tmp_path: Path) -> None:
    port = free_port()
    cfg = LoggingConfig(metrics_port=port, metrics_host="127.0.0.1", progress_bar=True)
    obs = Observability(tmp_path, cfg, total_steps=3)
    try:
        obs.log(1, {k: 0.5 for k in STEP_SCALARS})
        obs.log(2, {"rollout/accuracy/mean": 0.75, "actor/pg_loss": float("nan")})
        obs.log_samples(2, [{"response": "4", "correct": True}])
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "opd_rollout_accuracy_mean 0.75" in text
        assert "opd_trainer_step 2.0" in text
        for key in STEP_SCALARS:
            assert prometheus_name(key) in text
        with pytest.raises(OSError, match="logging.metrics_port"):
            Observability(tmp_path / "other", cfg, total_steps=1)
    finally:
        obs.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert set(STEP_SCALARS) <= set(records[0])
    assert records[1]["actor/pg_loss"] is None  # nan is not valid JSON
    assert json.loads((tmp_path / "samples.jsonl").read_text())["correct"] is True
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_disabled_sinks_write_nothing(tmp_path: Path) -> None:
    obs = Observability(
        tmp_path / "x", LoggingConfig(metrics_port=8003), total_steps=1, enabled=False
    )
    obs.log(1, {"a": 1.0})
    obs.close()
    assert not (tmp_path / "x").exists()


def test_opd_plot_writes_pngs(tmp_path: Path) -> None:
    runs = []
    for name, shift in (("a", 0.0), ("b", 0.1)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": 0, "eval/accuracy": 0.2 + shift, "eval/format_rate": 0.5}]
        for step in range(1, 6):
            lines.append(
                {
                    "step": step,
                    "rollout/accuracy/mean": 0.1 * step + shift,
                    "rollout/kl_divergence/mean": 10 - step,
                    "rollout/jsd/mean": -1 / step,
                    "timing/rollout_s": 1.0,
                    "timing/score_s": 0.5,
                    "timing/train_s": 2.0,
                    "timing/weight_sync_s": 0.1,
                    "timing/step_s": 3.7,
                    "actor/pg_loss": 0.1,
                    "actor/ppo_kl": 0.0,
                    "actor/pg_clipfrac": 0.0,
                    "actor/grad_norm": 1.0,
                }
            )
        lines.append(
            {
                "step": 5,
                "eval/accuracy": 0.4 + shift,
                "eval/format_rate": 0.9,
                "eval/reverse_kl": 1.0,
            }
        )
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(run)
    assert plot_main([str(runs[0])]) == 0
    for png in ("accuracy.png", "kl.png", "eval_accuracy.png", "timing.png", "loss.png"):
        data = (runs[0] / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert plot_main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "both")]) == 0
    assert (tmp_path / "both" / "timing.png").is_file()
    assert plot_main([str(tmp_path / "empty")]) == 1
