"""GSM8K data: the math prompt, loading, and a resumable prompt sampler (docs/design.md §5).

Where the data comes from (:func:`resolve_data_source`), first match wins:

1. the explicit value (the trainer's ``--data`` flag / config ``data.source``): a path, a hub
   id, or ``bundled``;
2. the environment variable ``OPD_DATA_DIR``;
3. the Hugging Face hub dataset ``openai/gsm8k`` (config ``main``).

``bundled`` names the GSM8K subset shipped inside this package (``trainer/gsm8k_subset/``:
the first 1,000 train and 200 test rows, unchanged; see its README), which is what the CPU
demo and the tests read, offline.

A local source may be a directory holding ``{split}.jsonl`` or ``{split}.parquet`` (or the
hub's own layout, ``main/{split}-*.parquet``), or a single ``.jsonl`` / ``.parquet`` file
(which is then the split, whatever ``split`` says). Rows need string fields ``question`` and
``answer``; the ground truth is the text after the last ``####`` of ``answer``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BUNDLED_DIR",
    "BUNDLED_SOURCE",
    "DATA_ENV_VAR",
    "HUB_DATASET_ID",
    "HUB_DATASET_CONFIG",
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "Example",
    "PromptSampler",
    "build_messages",
    "extract_ground_truth",
    "load_gsm8k",
    "resolve_data_source",
]

SYSTEM_PROMPT = "You are a helpful assistant."
USER_TEMPLATE = (
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)

DATA_ENV_VAR = "OPD_DATA_DIR"
HUB_DATASET_ID = "openai/gsm8k"
HUB_DATASET_CONFIG = "main"

Split = Literal["train", "test"]

#: The config / ``--data`` value that selects the subset shipped with the package.
BUNDLED_SOURCE = "bundled"
#: Where that subset lives (package data, so it is there in a wheel install too).
BUNDLED_DIR = Path(__file__).resolve().parent / "gsm8k_subset"
_FILE_SUFFIXES = (".jsonl", ".parquet")
_REQUIRED_FIELDS = ("question", "answer")


@dataclass(frozen=True)
class Example:
    """One GSM8K problem.

    ``index`` is the row's position in its split (stable across loads of the same data),
    ``answer`` the full reference solution and ``ground_truth`` its final answer (the text
    after the last ``####``, commas removed).
    """

    index: int
    question: str
    answer: str
    ground_truth: str


def build_messages(question: str) -> list[dict[str, str]]:
    """The chat messages for one problem: the system prompt and the templated user turn."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(question=question)},
    ]


def extract_ground_truth(answer: str) -> str:
    """The final answer of a GSM8K reference solution.

    Returns the text after the last ``####``, stripped, with commas (thousands separators)
    removed: ``"...\\n#### 1,000"`` gives ``"1000"``.

    Raises:
        ValueError: when there is no ``####`` or nothing follows it.
    """
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-200:]!r}")
    truth = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not truth:
        raise ValueError(f"GSM8K answer has nothing after its last '####': {answer[-200:]!r}")
    return truth


def resolve_data_source(explicit: str | None = None) -> str:
    """Decide where GSM8K is read from; the first of these that applies wins.

    1. ``explicit`` (e.g. the ``--data`` flag or ``data.source``): ``bundled`` gives the
       subset shipped with the package (:data:`BUNDLED_DIR`); anything else, a path or a
       hub id, is returned as given;
    2. the ``OPD_DATA_DIR`` environment variable, when set and non-empty (``bundled`` is
       understood there too);
    3. the hub dataset id ``openai/gsm8k``.

    Nothing is loaded here, and no other place on disk is looked at: a run reads exactly
    the data its configuration names.
    """
    for value in (explicit, os.environ.get(DATA_ENV_VAR)):
        chosen = "" if value is None else str(value).strip()
        if chosen:
            return str(BUNDLED_DIR) if chosen == BUNDLED_SOURCE else chosen
    return HUB_DATASET_ID


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def _read_parquet(paths: Sequence[Path]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet([path])
    raise ValueError(f"unsupported GSM8K file type {path} (expected .jsonl or .parquet)")


def _split_files_in_dir(directory: Path, split: str) -> tuple[list[Path], list[str]]:
    """The files holding ``split`` in ``directory``, and the patterns that were tried."""
    tried: list[str] = []
    for name in (f"{split}.jsonl", f"{split}.parquet"):
        tried.append(name)
        if (directory / name).is_file():
            return [directory / name], tried
    for pattern in (f"{HUB_DATASET_CONFIG}/{split}-*.parquet", f"{split}-*.parquet"):
        tried.append(pattern)
        shards = sorted(directory.glob(pattern))
        if shards:
            return shards, tried
    return [], tried


def _is_pathlike(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path rather than a hub id."""
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith(_FILE_SUFFIXES)
        or "\\" in source
        or source.count("/") > 1
    )


def _load_rows(split: str, source: str) -> tuple[list[Any], str]:
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path), str(path)
    if path.is_dir():
        files, tried = _split_files_in_dir(path, split)
        if not files:
            raise FileNotFoundError(
                f"no GSM8K {split!r} split in {path.resolve()}: looked for "
                + ", ".join(tried)
                + f". Point --data or {DATA_ENV_VAR} at a directory holding {split}.jsonl "
                f"(fields 'question', 'answer'), at a single .jsonl/.parquet file, "
                f"or at the hub id {HUB_DATASET_ID!r}."
            )
        if files[0].suffix == ".jsonl":
            return _read_jsonl(files[0]), str(files[0])
        return _read_parquet(files), ", ".join(str(f) for f in files)
    if _is_pathlike(source):
        raise FileNotFoundError(
            f"GSM8K source {source!r} does not exist (resolved to {path.resolve()}). Point "
            f"--data or {DATA_ENV_VAR} at a directory holding {split}.jsonl, at a "
            f".jsonl/.parquet file, or at the hub id {HUB_DATASET_ID!r}."
        )
    return _load_from_hub(source, split), f"hub:{source}[{HUB_DATASET_CONFIG}/{split}]"


def _load_from_hub(dataset_id: str, split: str) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, HUB_DATASET_CONFIG, split=split)
    except Exception as exc:
        raise RuntimeError(
            f"could not load GSM8K {split!r} from the hub dataset {dataset_id!r} "
            f"(config {HUB_DATASET_CONFIG!r}; no local path of that name exists either): "
            f"{type(exc).__name__}: {exc}. Offline? Point --data or {DATA_ENV_VAR} at a "
            f"local copy (a directory with {split}.jsonl), or at {BUNDLED_SOURCE!r} for the "
            "subset shipped with the package."
        ) from exc
    return list(ds)


def _to_examples(rows: Iterable[Any], where: str) -> list[Example]:
    examples: list[Example] = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: row {index} is a {type(row).__name__}, not an object")
        missing = [f for f in _REQUIRED_FIELDS if not isinstance(row.get(f), str)]
        if missing:
            raise ValueError(
                f"{where}: row {index} lacks string field(s) {missing} "
                f"(has {sorted(row.keys())}); GSM8K rows need 'question' and 'answer'"
            )
        try:
            truth = extract_ground_truth(row["answer"])
        except ValueError as exc:
            raise ValueError(f"{where}: row {index}: {exc}") from exc
        examples.append(
            Example(index=index, question=row["question"], answer=row["answer"], ground_truth=truth)
        )
    return examples


def load_gsm8k(split: Split, source: str | None = None, limit: int | None = None) -> list[Example]:
    """Load one GSM8K split as a list of :class:`Example`.

    Args:
        split: ``"train"`` or ``"test"``.
        source: a directory (``{split}.jsonl``, ``{split}.parquet``, ``main/{split}-*.parquet``
            or ``{split}-*.parquet``), a single ``.jsonl``/``.parquet`` file (used as the split
            as is), or a hub dataset id loaded with ``datasets.load_dataset(id, "main",
            split=split)``, or ``bundled`` (the subset shipped with the package). ``None``
            means :func:`resolve_data_source` decides.
        limit: keep only the first ``limit`` rows (in file order).

    Raises:
        FileNotFoundError: a local source that does not exist or holds no such split; the
            message names the path and the files looked for.
        ValueError: a bad ``split``/``limit``, malformed rows (missing ``question``/``answer``
            or no ``####``), or an empty split.
        RuntimeError: the hub could not be reached or has no such dataset.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    resolved = resolve_data_source(source)
    rows, where = _load_rows(split, resolved)
    if limit is not None:
        rows = rows[:limit]
    examples = _to_examples(rows, where)
    if not examples and limit != 0:
        raise ValueError(f"{where}: the GSM8K {split!r} split is empty")
    return examples


def _data_fingerprint(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.index}\x00{ex.question}\x00{ex.ground_truth}\x01".encode())
    return digest.hexdigest()[:16]


class PromptSampler:
    """Deterministic epoch-wise shuffling over a list of examples, resumable exactly.

    Epoch ``e`` visits every example once, in a permutation drawn from a generator seeded
    with ``(seed, e)`` (the same on every platform and Python version); with
    ``shuffle=False`` the order is the list's own. :meth:`next_batch` crosses epoch
    boundaries: a batch may end one epoch and start the next.

    Exhaustion: with ``max_epochs`` set, the sampler stops after that many full epochs. The
    call that reaches the end returns a *short final batch* (whatever was left, possibly
    fewer than ``n``); any later call raises :class:`StopIteration`. ``max_epochs=None``
    never runs out. The trainer's "one epoch of GSM8K train" is ``max_epochs=1``.

    :meth:`state_dict` / :meth:`load_state_dict` capture ``(seed, epoch, cursor)``, so a
    sampler rebuilt over the same examples continues with exactly the same order: no example
    lost or repeated across a resume.
    """

    STATE_VERSION = 1

    def __init__(
        self,
        examples: Sequence[Example],
        seed: int = 0,
        *,
        shuffle: bool = True,
        max_epochs: int | None = None,
    ) -> None:
        """Wrap ``examples`` (not copied deeply; must stay unchanged while sampling)."""
        if len(examples) == 0:
            raise ValueError("PromptSampler needs at least one example")
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1 or None, got {max_epochs}")
        self._examples: list[Example] = list(examples)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._max_epochs = max_epochs
        self._epoch = 0
        self._cursor = 0
        self._order: list[int] = self._permutation(0)
        self._fingerprint = _data_fingerprint(self._examples)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self._examples)))
        if self._shuffle:
            # A string seed goes through sha512: stable across platforms and Python versions.
            random.Random(f"opd-prompt-sampler:{self._seed}:{epoch}").shuffle(order)
        return order

    @property
    def num_examples(self) -> int:
        """How many examples one epoch visits."""
        return len(self._examples)

    @property
    def seed(self) -> int:
        """The base seed of the shuffling."""
        return self._seed

    @property
    def max_epochs(self) -> int | None:
        """The number of epochs after which the sampler is exhausted (``None``: never)."""
        return self._max_epochs

    @property
    def epoch(self) -> int:
        """The current (0-based) epoch; equals ``max_epochs`` once exhausted."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """How many examples of the current epoch have been handed out."""
        return self._cursor

    @property
    def exhausted(self) -> bool:
        """Whether ``max_epochs`` full epochs have been handed out."""
        return self._max_epochs is not None and self._epoch >= self._max_epochs

    @property
    def consumed(self) -> int:
        """Total examples handed out so far, over all epochs."""
        return self._epoch * len(self._examples) + self._cursor

    def epoch_order(self, epoch: int) -> list[Example]:
        """The full order of epoch ``epoch`` (for inspection; does not move the sampler)."""
        return [self._examples[i] for i in self._permutation(epoch)]

    def next_batch(self, n: int) -> list[Example]:
        """The next ``n`` examples, crossing into the next (reshuffled) epoch as needed.

        Returns fewer than ``n`` only for the final batch before ``max_epochs`` is reached.

        Raises:
            StopIteration: the sampler was already exhausted.
            ValueError: ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        if self.exhausted:
            raise StopIteration(f"PromptSampler exhausted after {self._max_epochs} epoch(s)")
        batch: list[Example] = []
        while len(batch) < n and not self.exhausted:
            take = min(n - len(batch), len(self._order) - self._cursor)
            batch.extend(self._examples[i] for i in self._order[self._cursor : self._cursor + take])
            self._cursor += take
            if self._cursor == len(self._order):
                self._epoch += 1
                self._cursor = 0
                self._order = self._permutation(self._epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the position (not the examples themselves)."""
        return {
            "version": self.STATE_VERSION,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "num_examples": len(self._examples),
            "max_epochs": self._max_epochs,
            "data_fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` snapshot.

        The saved ``seed`` and ``shuffle`` replace this sampler's own (they define the order
        being resumed); ``max_epochs`` stays as constructed, so a run can be extended.

        Raises:
            ValueError: the snapshot is malformed, from another version, or was taken over
                different examples (count or content fingerprint differ).
        """
        try:
            version = int(state["version"])
            seed = int(state["seed"])
            shuffle = bool(state["shuffle"])
            epoch = int(state["epoch"])
            cursor = int(state["cursor"])
            num_examples = int(state["num_examples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed PromptSampler state {dict(state)!r}: {exc}") from exc
        if version != self.STATE_VERSION:
            raise ValueError(f"PromptSampler state version {version} is not {self.STATE_VERSION}")
        if num_examples != len(self._examples):
            raise ValueError(
                f"PromptSampler state was saved over {num_examples} examples, "
                f"this sampler has {len(self._examples)}: not the same data"
            )
        fingerprint = state.get("data_fingerprint")
        if fingerprint is not None and fingerprint != self._fingerprint:
            raise ValueError(
                "PromptSampler state was saved over different examples "
                f"(fingerprint {fingerprint} != {self._fingerprint})"
            )
        if epoch < 0 or not 0 <= cursor < num_examples:
            raise ValueError(f"PromptSampler state out of range: epoch={epoch} cursor={cursor}")
        self._seed = seed
        self._shuffle = shuffle
        self._epoch = epoch
        self._cursor = cursor
        self._order = self._permutation(epoch)
