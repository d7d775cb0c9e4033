"""GSM8K prompt, loading, source resolution and the resumable prompt sampler (trainer/data.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from trainer import data as data_mod
from trainer.data import (
    BUNDLED_DIR,
    BUNDLED_SOURCE,
    SYSTEM_PROMPT,
    USER_TEMPLATE,
    Example,
    PromptSampler,
    build_messages,
    extract_ground_truth,
    load_gsm8k,
    resolve_data_source,
)

ROWS = [
    {"question": "What is 1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
    {"question": "How many cents in $12?", "answer": "12 * 100 = 1200\n#### 1,200"},
    {"question": "Owe 3, pay 6?", "answer": "3 - 6 = -3\n#### -3"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _examples(n: int) -> list[Example]:
    return [Example(i, f"q{i}", f"a\n#### {i}", str(i)) for i in range(n)]


# --- prompt -----------------------------------------------------------------------------


def test_prompt_text_is_exact() -> None:
    assert SYSTEM_PROMPT == "You are a helpful assistant."
    messages = build_messages("What is 2+2?")
    assert messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": "What is 2+2?\nPlease reason step by step, and put your final answer "
            "within \\boxed{}.",
        },
    ]
    assert USER_TEMPLATE.format(question="Q") == messages[1]["content"].replace("What is 2+2?", "Q")


def test_prompt_keeps_braces_in_the_question() -> None:
    assert build_messages("Is {x} a set?")[1]["content"].startswith("Is {x} a set?\n")


# --- ground truth -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "truth"),
    [
        ("work\n#### 72", "72"),
        ("#### 1,000,000", "1000000"),
        ("x #### 5 then\n#### -3 ", "-3"),
        ("####7", "7"),
        ("a\n#### 2.5\n", "2.5"),
    ],
)
def test_extract_ground_truth(answer: str, truth: str) -> None:
    assert extract_ground_truth(answer) == truth


@pytest.mark.parametrize("answer", ["no marker at all", "work\n####   \n"])
def test_extract_ground_truth_rejects_missing_answer(answer: str) -> None:
    with pytest.raises(ValueError, match="####"):
        extract_ground_truth(answer)


# --- loading ----------------------------------------------------------------------------


def test_load_from_bundled_copy(gsm8k_dir: Path) -> None:
    train = load_gsm8k("train", str(gsm8k_dir), limit=5)
    assert [e.index for e in train] == list(range(5))
    assert train[0].ground_truth == "72" and train[0].question.startswith("Natalia")
    test = load_gsm8k("test", gsm8k_dir, limit=3)
    assert len(test) == 3 and all(e.ground_truth for e in test)


def test_load_from_directory_jsonl(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    _write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    train = load_gsm8k("train", str(tmp_path))
    assert [(e.index, e.ground_truth) for e in train] == [(0, "2"), (1, "1200"), (2, "-3")]
    assert train[1] == Example(1, ROWS[1]["question"], ROWS[1]["answer"], "1200")
    assert len(load_gsm8k("test", str(tmp_path))) == 1
    assert len(load_gsm8k("train", str(tmp_path), limit=2)) == 2
    assert load_gsm8k("train", str(tmp_path), limit=0) == []


def test_load_from_single_files(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "some.jsonl", ROWS)
    parquet = _write_parquet(tmp_path / "some.parquet", ROWS)
    from_jsonl = load_gsm8k("test", str(jsonl))
    from_parquet = load_gsm8k("test", str(parquet))
    assert from_jsonl == from_parquet
    assert [e.ground_truth for e in from_parquet] == ["2", "1200", "-3"]


def test_load_from_directory_parquet_and_hub_layout(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "flat" / "train.parquet", ROWS)
    assert len(load_gsm8k("train", str(tmp_path / "flat"))) == 3
    hub = tmp_path / "hub"
    _write_parquet(hub / "main" / "train-00000-of-00002.parquet", ROWS[:2])
    _write_parquet(hub / "main" / "train-00001-of-00002.parquet", ROWS[2:])
    _write_parquet(hub / "main" / "test-00000-of-00001.parquet", ROWS[:1])
    train = load_gsm8k("train", str(hub))
    assert [e.ground_truth for e in train] == ["2", "1200", "-3"]
    assert [e.index for e in train] == [0, 1, 2]
    assert len(load_gsm8k("test", str(hub))) == 1


def test_missing_split_names_path_and_candidates(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(FileNotFoundError) as info:
        load_gsm8k("test", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path.resolve()) in message
    assert "test.jsonl" in message and "main/test-*.parquet" in message
    assert "OPD_DATA_DIR" in message


def test_missing_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "gsm8k"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_gsm8k("train", str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_gsm8k("train", "./no-such-file.jsonl")


def test_hub_id_goes_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple] = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_gsm8k("test", "openai/gsm8k", limit=2)
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert [e.ground_truth for e in examples] == ["2", "1200"]


def test_hub_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="openai/gsm8k.*OPD_DATA_DIR"):
        load_gsm8k("train", "openai/gsm8k")


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"question": "q"}], r"row 0 lacks .*'answer'"),
        ([ROWS[0], {"question": 3, "answer": "#### 1"}], r"row 1 lacks .*'question'"),
        ([{"question": "q", "answer": "no marker"}], r"row 0: .*####"),
        ([], "empty"),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, rows: list[dict], match: str) -> None:
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=match) as info:
        load_gsm8k("train", str(tmp_path))
    assert str(path) in str(info.value)


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        load_gsm8k("train", str(path))


def test_bad_arguments(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError, match="split"):
        load_gsm8k("validation", str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        load_gsm8k("train", str(tmp_path), limit=-1)


# --- source resolution ------------------------------------------------------------------


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory and no OPD_DATA_DIR."""
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("OPD_DATA_DIR", raising=False)
    return tmp_path


def test_resolution_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3. nothing configured: the hub
    assert resolve_data_source(None) == "openai/gsm8k"
    # 2. the environment wins over the hub
    monkeypatch.setenv("OPD_DATA_DIR", "/env/gsm8k")
    assert resolve_data_source(None) == "/env/gsm8k"
    # 1. an explicit value wins over both
    assert resolve_data_source("/explicit/dir") == "/explicit/dir"
    assert resolve_data_source("some/hub-id") == "some/hub-id"
    assert resolve_data_source("bundled") == str(BUNDLED_DIR)
    # "bundled" works from the environment too
    monkeypatch.setenv("OPD_DATA_DIR", " bundled ")
    assert resolve_data_source(None) == str(BUNDLED_DIR)
    # an empty value counts as unset, at both levels
    monkeypatch.setenv("OPD_DATA_DIR", "")
    assert resolve_data_source("  ") == "openai/gsm8k"


def test_load_uses_the_environment(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = isolated / "env"
    _write_jsonl(env_dir / "train.jsonl", ROWS)
    monkeypatch.setenv("OPD_DATA_DIR", str(env_dir))
    assert [e.ground_truth for e in load_gsm8k("train")] == ["2", "1200", "-3"]
    # an explicit source still wins over the environment
    assert len(load_gsm8k("train", BUNDLED_SOURCE)) == BUNDLED_ROWS["train"][0]


def test_load_falls_back_to_the_hub(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple] = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return ROWS[:2]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert [e.ground_truth for e in load_gsm8k("train")] == ["2", "1200"]
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]


def test_no_path_outside_the_configuration_is_consulted(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GSM8K copy lying around (here in a folder beside the working directory) is never
    picked up by itself: only --data / data.source, OPD_DATA_DIR and the hub are."""
    import datasets

    _write_jsonl(isolated / "a" / "shared" / "data" / "gsm8k" / "test.jsonl", ROWS[:1])  # ../
    looked_at: list[str] = []
    real_stat = Path.stat

    def spying_stat(self: Path, *args, **kwargs):
        looked_at.append(str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", spying_stat)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ROWS)
    assert resolve_data_source(None) == "openai/gsm8k"
    assert len(load_gsm8k("test")) == 3  # from the (mocked) hub, not from the decoy
    assert not [p for p in looked_at if "shared" in Path(p).parts]
    assert "shared" not in Path(data_mod.__file__).read_text(encoding="utf-8")


# --- the bundled subset -----------------------------------------------------------------

#: split -> (rows, sha256 of the file): the first N rows of GSM8K's train.jsonl / test.jsonl
#: (github.com/openai/grade-school-math), hashed from the original files when the subset was
#: cut, so any edit to a row (or a different cut) fails here.
BUNDLED_ROWS = {
    "train": (1000, "73e81c100d0c321f074b5740e4365cad29bae7577d770d7f9cce722f00b4ff3e"),
    "test": (200, "bd70035c7acaf107b4e0d077c605a23c3d3a0acb4342e5bc60099e6ad9ff4284"),
}


@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_subset_is_the_first_rows_unchanged(split: str) -> None:
    rows, sha256 = BUNDLED_ROWS[split]
    raw = (BUNDLED_DIR / f"{split}.jsonl").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == sha256
    assert raw.count(b"\n") == rows and raw.endswith(b"\n")
    examples = load_gsm8k(split, BUNDLED_SOURCE)  # type: ignore[arg-type]
    assert len(examples) == rows
    assert [e.index for e in examples] == list(range(rows))


def test_bundled_subset_ships_its_licence_and_provenance() -> None:
    assert "MIT License" in (BUNDLED_DIR / "LICENSE").read_text(encoding="utf-8")
    readme = (BUNDLED_DIR / "README.md").read_text(encoding="utf-8")
    assert "Training Verifiers to Solve Math Word Problems" in readme
    assert "https://github.com/openai/grade-school-math" in readme
    assert "first 1,000" in readme and "first 200" in readme


def test_gsm8k_dir_fixture_is_the_bundled_subset(gsm8k_dir: Path) -> None:
    assert gsm8k_dir == BUNDLED_DIR


# --- sampler ----------------------------------------------------------------------------


def _indices(batch: list[Example]) -> list[int]:
    return [e.index for e in batch]


def test_sampler_is_deterministic_and_a_permutation() -> None:
    a = PromptSampler(_examples(50), seed=7)
    b = PromptSampler(_examples(50), seed=7)
    first = _indices(a.next_batch(50))
    assert first == _indices(b.next_batch(50))
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == _indices(PromptSampler(_examples(50), seed=7).epoch_order(0))


def test_different_seeds_and_epochs_give_different_orders() -> None:
    s1 = PromptSampler(_examples(50), seed=1)
    s2 = PromptSampler(_examples(50), seed=2)
    assert _indices(s1.next_batch(50)) != _indices(s2.next_batch(50))
    # epochs reshuffle, and seed 1 epoch 1 is not seed 2 epoch 0 ("seed + epoch" pitfall)
    assert _indices(s1.epoch_order(1)) != _indices(s1.epoch_order(0))
    assert _indices(s1.epoch_order(1)) != _indices(s2.epoch_order(0))


def test_no_shuffle_keeps_file_order() -> None:
    s = PromptSampler(_examples(5), shuffle=False)
    assert _indices(s.next_batch(7)) == [0, 1, 2, 3, 4, 0, 1]


def test_batches_cross_epoch_boundaries() -> None:
    s = PromptSampler(_examples(10), seed=3)
    got = [_indices(s.next_batch(4)) for _ in range(5)]  # 20 = two full epochs
    flat = [i for b in got for i in b]
    assert flat[:10] == _indices(s.epoch_order(0))
    assert flat[10:] == _indices(s.epoch_order(1))
    assert (s.epoch, s.cursor, s.consumed) == (2, 0, 20)
    assert len(got[2]) == 4  # the batch that spans the boundary is full


def test_max_epochs_gives_a_short_final_batch_then_stops() -> None:
    s = PromptSampler(_examples(10), seed=0, max_epochs=1)
    sizes = [len(s.next_batch(4)) for _ in range(3)]
    assert sizes == [4, 4, 2]
    assert s.exhausted and s.epoch == 1
    with pytest.raises(StopIteration):
        s.next_batch(4)
    two = PromptSampler(_examples(10), seed=0, max_epochs=2)
    seen = []
    while not two.exhausted:
        seen += _indices(two.next_batch(3))
    assert len(seen) == 20 and sorted(seen) == sorted(list(range(10)) * 2)


@pytest.mark.parametrize("stop_after", [0, 1, 3, 5, 6])
def test_state_dict_round_trip_continues_identically(stop_after: int) -> None:
    reference = PromptSampler(_examples(17), seed=11, max_epochs=3)
    expected = []
    while not reference.exhausted:
        expected.append(_indices(reference.next_batch(5)))

    first = PromptSampler(_examples(17), seed=11, max_epochs=3)
    got = [_indices(first.next_batch(5)) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(_examples(17), seed=999, max_epochs=3)  # the saved seed wins
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.cursor) == (first.epoch, first.cursor)
    while not resumed.exhausted:
        got.append(_indices(resumed.next_batch(5)))
    assert got == expected


def test_load_state_dict_refuses_other_data() -> None:
    state = PromptSampler(_examples(10), seed=1).state_dict()
    with pytest.raises(ValueError, match="10 examples"):
        PromptSampler(_examples(11)).load_state_dict(state)
    changed = _examples(10)
    changed[3] = Example(3, "another question", "#### 3", "3")
    with pytest.raises(ValueError, match="different examples"):
        PromptSampler(changed).load_state_dict(state)
    with pytest.raises(ValueError, match="malformed"):
        PromptSampler(_examples(10)).load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="out of range"):
        PromptSampler(_examples(10)).load_state_dict({**state, "cursor": 10})


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PromptSampler([])
    with pytest.raises(ValueError):
        PromptSampler(_examples(3), max_epochs=0)
    with pytest.raises(ValueError):
        PromptSampler(_examples(3)).next_batch(0)


def test_one_epoch_of_real_train(gsm8k_dir: Path) -> None:
    examples = load_gsm8k("train", gsm8k_dir)
    sampler = PromptSampler(examples, seed=0, max_epochs=1)
    seen = 0
    while not sampler.exhausted:
        seen += len(sampler.next_batch(96))
    assert seen == len(examples) == BUNDLED_ROWS["train"][0]
