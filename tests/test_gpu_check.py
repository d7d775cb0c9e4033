"""bench/gpu_check.sh and its training step, checked without a GPU.

The script only runs where a device is lent; what can be pinned here is that it parses, that
the training step's trainer arguments make a valid config on the CUDA path (bf16 autocast,
eval and checkpoints off, the shape asked for), and that the step table reads the trainer's
metrics. `bench/gpu_train_check.py --device cpu` with tiny shapes runs the same code path end
to end (documented in docs/benchmarks.md); it is not part of the suite (services take ~1 min).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from tests.scripts import REPO_ROOT, load_script

BENCH = REPO_ROOT / "bench"


def _module():
    return load_script(BENCH / "gpu_train_check.py")


def test_gpu_check_script_parses_and_runs_every_step() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    text = (BENCH / "gpu_check.sh").read_text()
    for step in ("1_kernel_tests", "2a_bench_opd_loss", "2b_bench_linear_logprob", "3_opd_train"):
        assert f"run {step} " in text, step
    assert "bench/gpu_train_check.py" in text and ".whl/*.whl" in text


def test_training_step_arguments_are_a_valid_cuda_config(tmp_path: Path) -> None:
    from trainer.config import load_config

    mod = _module()
    args = argparse.Namespace(
        device="cuda", prompts=8, samples=4, max_tokens=128, steps=3)
    over = mod.overrides(args, tmp_path / "t", tmp_path / "s",
                         ("http://127.0.0.1:1", "http://127.0.0.1:2"), tmp_path / "run",
                         tmp_path / "w")
    cfg = load_config(mod.CONFIG, over)
    assert cfg.student.device == "cuda" and cfg.student.autocast_dtype == "bfloat16"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt,
            cfg.rollout.max_tokens, cfg.trainer.total_steps) == (8, 4, 128, 3)
    assert not (cfg.eval.at_start or cfg.eval.at_end or cfg.eval.interval)
    assert not cfg.checkpoint.at_end and cfg.sync.method == "load"
    args.device = "cpu"
    cpu = load_config(mod.CONFIG, mod.overrides(args, tmp_path / "t", tmp_path / "s",
                      ("http://a:1", "http://b:2"), tmp_path / "run", tmp_path / "w"))
    assert cpu.student.autocast_dtype is None


def test_summary_reads_the_trainer_metrics() -> None:
    mod = _module()
    records = [{"step": 0, "eval/format_rate": 0.1}] + [
        {"step": i, "timing/rollout_s": 1.0, "timing/score_s": 0.5, "timing/wait_s": 1.5,
         "timing/train_s": 2.0, "timing/weight_sync_s": 0.1, "timing/step_s": s,
         "throughput/tokens_per_s": 100.0}
        for i, s in ((1, 9.0), (2, 4.0), (3, 6.0))
    ]
    summary = mod.summarize(records)
    assert [r["n"] for r in summary["steps"]] == [1, 2, 3]
    assert summary["steps"][0]["train"] == 2.0
    assert summary["median_step_s_after_first"] == 5.0  # steps 2 and 3; step 1 is the warm-up
