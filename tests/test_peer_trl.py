"""bench/peer_trl.py without trl or models: its flags, its figures and its opd config."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script
from trainer.config import load_config

SCRIPT = Path("bench") / "peer_trl.py"  # load_script resolves it from the repository root


@pytest.fixture(scope="module")
def peer() -> ModuleType:
    return load_script(SCRIPT)


def test_defaults_are_the_demo_shape(peer: ModuleType) -> None:
    args = peer.parse_args([])
    assert (args.steps, args.prompts, args.samples, args.max_tokens) == (4, 8, 4, 128)
    assert args.only is None and args.lr is None and args.json_out is None


@pytest.mark.parametrize(
    "argv", [["--teacher", "t"], ["--only", "both"], ["--steps", "0"], ["--opd-backend", "x"]]
)
def test_bad_flags_are_refused(peer: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        peer.parse_args(argv)


def test_warmup_step_left_out_from_three_steps(peer: ModuleType) -> None:
    res = peer.summarize("opd", [10.0, 2.0, 4.0, 3.0], [100, 40, 80, 60])
    assert res["warmup_steps_excluded"] == 1
    assert res["median_step_s"] == 3.0
    assert res["tokens_per_s"] == pytest.approx(180 / 9.0)
    assert res["step_s"] == [10.0, 2.0, 4.0, 3.0]  # every step is still reported


def test_short_runs_count_every_step(peer: ModuleType) -> None:
    res = peer.summarize("trl", [3.0, 1.0], [30, 10], exact=False)
    assert res["warmup_steps_excluded"] == 0
    assert res["median_step_s"] == 2.0
    assert res["tokens_per_s"] == pytest.approx(10.0)
    assert res["tokens_exact"] is False


def test_ratio_and_table(peer: ModuleType) -> None:
    opd = peer.summarize("opd", [5.0, 2.0, 2.0], [64, 64, 64])
    trl = peer.summarize("trl", [9.0, 6.0, 6.0], [64, 64, 64], exact=False)
    r = peer.ratio(trl, opd)
    assert r == pytest.approx(3.0)
    assert peer.ratio(trl, None) is None
    text = peer.table([opd, trl], r)
    assert "| opd | 2.00 | 32.0 | 1.00 |" in text
    assert "| trl | 6.00 | 10.7 (upper bound) | 3.00 |" in text


def test_opd_overrides_make_a_valid_config_with_only_the_step(
    peer: ModuleType, tmp_path: Path
) -> None:
    args = peer.parse_args(["--steps", "3", "--prompts", "2", "--samples", "3", "--lr", "1e-4"])
    cfg = load_config(peer.CONFIG, peer.opd_overrides(args, "student-dir", tmp_path))
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (2, 3)
    assert cfg.rollout.max_tokens == 128 and cfg.trainer.total_steps == 3
    assert cfg.trainer.lr == 1e-4 and cfg.sync.max_staleness == 0
    assert not (cfg.eval.at_start or cfg.eval.at_end or cfg.eval.interval)
    assert not (cfg.checkpoint.at_end or cfg.checkpoint.interval)
    assert cfg.logging.metrics_port == 0
