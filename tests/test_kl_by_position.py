"""bench/kl_by_position.py without services: its position blocks and their sums."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.scripts import load_script

SCRIPT = Path("bench") / "kl_by_position.py"  # load_script resolves it from the repository root


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


def test_blocks_head_then_forty_token_blocks_then_tail(bench: ModuleType) -> None:
    labels = [bench.position_label(i, 100) for i in range(100)]
    assert labels[:5] == ["0-4"] * 5
    assert labels[5:40] == ["5-39"] * 35
    assert labels[40:80] == ["40-79"] * 40
    assert labels[80:95] == ["80-119"] * 15
    assert labels[95:] == ["last 5"] * 5


def test_a_short_answer_is_head_first_then_tail(bench: ModuleType) -> None:
    """In an answer of 7 tokens the first 5 are the head, the remaining 2 the tail."""
    assert [bench.position_label(i, 7) for i in range(7)] == ["0-4"] * 5 + ["last 5"] * 2


def test_sums_add_up_to_the_whole_sample_figures(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    diffs = [rng.normal(size=n) for n in (160, 3, 47, 0, 90)]
    res = bench.kl_by_position(diffs)
    total = sum(float(d.sum()) for d in diffs)
    assert sum(res.sums.values()) == pytest.approx(total)
    assert sum(res.counts.values()) == 300
    assert res.per_token == pytest.approx(total / 300)
    assert res.per_answer == pytest.approx(total / 5)  # the empty answer counts as an answer
    assert res.mean_length == pytest.approx(60.0)
    assert res.sums["0-4"] == pytest.approx(sum(float(d[:5].sum()) for d in diffs))
    order = sorted(res.sums, key=bench.block_order)
    assert order[0] == "0-4" and order[-1] == "last 5"
    assert order[1:-1] == ["5-39", "40-79", "80-119", "120-159"]


def test_nothing_sampled_is_zero(bench: ModuleType) -> None:
    res = bench.kl_by_position([])
    assert (res.per_token, res.per_answer, res.mean_length, res.sums) == (0.0, 0.0, 0.0, {})


def test_defaults(bench: ModuleType) -> None:
    args = bench.parse_args(
        ["cfg.yaml", "student.model=m", "--teacher-url", "t", "--rollout-url", "r"]
    )
    assert (args.prompts, args.samples, args.seeds, args.load) == (32, 2, [0, 1], None)
    assert args.overrides == ["student.model=m"]
