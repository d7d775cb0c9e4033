"""Generation in the hf backend: rows, static batches (groups) with a KV cache, stop rules.

A generate request becomes `len(prompts) * n` rows. A group prefills each distinct prompt once
(left-padded, explicit `position_ids` so the padding does not shift positions), expands the
cache to its rows (the `n` samples of a prompt share the prefill), then decodes one token per
step; finished rows leave the batch (and its cache) at once.

Stopping (vLLM's order and conventions), after each sampled token:
- the tokenizer's EOS (unless `ignore_eos`) -> `stop`, `stop_reason` None; another EOS id of
  the generation config, or a `stop_token_ids` entry -> `stop`, `stop_reason` = that id (an
  extra generation-config EOS is ignored with `ignore_eos`, as in vLLM); both are included in
  `token_ids` and excluded from `text`;
- then stop strings, searched in the incrementally detokenized text (special tokens skipped):
  on a match `finish_reason="stop"`, `stop_reason` = the string, and `text` is cut *before* it;
  `token_ids`/`logprobs` keep every sampled token up to and including the one that completed
  the stop string (vLLM's output, and the tokens the policy actually produced, which is what
  OPD trains on);
- finally `max_tokens`, or the prompt reaching `max_model_len`, -> `length`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import GeneratedSample, SamplingSpec
from ..stop_strings import text_before_stop
from .model import ModelRunner
from .sampling import RowSampling, row_seed, sample


@dataclass(eq=False)
class GenRequest:
    """One `generate` call: `len(prompts) * n` rows, resolved when all have finished."""

    prompts: list[list[int]]
    spec: SamplingSpec
    future: asyncio.Future
    samples: list[list[GeneratedSample | None]]
    remaining: int
    pending: deque[Row] = field(default_factory=deque)
    started: bool = False
    isolated: bool = False  # never shares a group (seeded, or failed inside a shared group)


@dataclass(eq=False)
class Row:
    """One (prompt, sample) being generated."""

    req: GenRequest
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    max_new: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] | None = None
    generator: torch.Generator | None = None
    # incremental detokenization, only used when the request has stop strings
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    final_text: str = ""
    dead: bool = False  # the request is done (cancelled / failed): drop this row
    delivered: bool = False  # its sample is in the request's result

    def reset(self) -> None:
        """Forget generated state (the row is re-queued after a failed shared batch)."""
        self.token_ids, self.logprobs = [], []
        self.top = [] if self.req.spec.top_logprobs > 0 else None
        self.generator = None
        self.text, self.prefix_offset, self.read_offset = "", 0, 0
        self.finish_reason, self.stop_reason, self.final_text = None, None, ""

    def sample(self) -> GeneratedSample:
        """The finished row as the engine returns it."""
        return GeneratedSample(
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            text=self.final_text,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            top_logprobs=self.top,
            stop_reason=self.stop_reason,
        )


def new_request(
    prompts: list[list[int]], spec: SamplingSpec, future: asyncio.Future, max_model_len: int
) -> GenRequest:
    """A request with one pending row per (prompt, sample)."""
    req = GenRequest(
        prompts=prompts,
        spec=spec,
        future=future,
        samples=[[None] * spec.n for _ in prompts],
        remaining=len(prompts) * spec.n,
        isolated=spec.seed is not None,
    )
    for pi, p in enumerate(prompts):
        max_new = min(spec.max_tokens, max_model_len - len(p))
        for si in range(spec.n):
            row = Row(req=req, prompt_index=pi, sample_index=si, prompt_ids=p, max_new=max_new)
            row.reset()
            req.pending.append(row)
    return req


@dataclass(eq=False)
class Group:
    """A static generation batch with its own KV cache."""

    rows: list[Row]  # rows still decoding
    generator: torch.Generator | None  # shared generator of an unseeded group
    requests: set[GenRequest]
    members: tuple[Row, ...] = ()  # every row the group started with
    prefilled: bool = False
    cache: Any = None
    attention_mask: torch.Tensor | None = None
    next_pos: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    params: RowSampling | None = None


class GroupStepper:
    """Runs generation groups on a model: prefill, one decode step, the stop rules.

    Blocking methods: the scheduler calls `step` from a worker thread.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Any) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.observer: Callable[[str, int], None] | None = None

    def step(self, group: Group) -> list[Row]:
        """Prefill if needed, drop dead rows, sample one token per row, drop finished rows,
        and run the decode forward for the rest. Returns the rows that finished."""
        runner = self.runner
        with runner.lock, torch.inference_mode():
            runner.check_alive()
            if all(r.dead for r in group.rows):
                group.rows, group.cache = [], None
                return []
            if not group.prefilled:
                self.prefill(group)
            keep = [i for i, r in enumerate(group.rows) if not r.dead]
            if len(keep) != len(group.rows):
                self.select_rows(group, keep)
            if not group.rows:
                return []
            assert group.logits is not None and group.params is not None
            tokens, token_lps, top_vals, top_ids = sample(
                group.logits, group.params, group.generator, [r.generator for r in group.rows]
            )
            finished: list[Row] = []
            keep = []
            for i, row in enumerate(group.rows):
                row.token_ids.append(tokens[i])
                row.logprobs.append(token_lps[i])
                if row.top is not None:
                    k = row.req.spec.top_logprobs
                    row.top.append(dict(zip(top_ids[i][:k], top_vals[i][:k], strict=True)))
                if self.check_finished(row):
                    finished.append(row)
                else:
                    keep.append(i)
            if not keep:
                group.rows = []
                group.cache = None
                return finished
            next_tokens = torch.tensor(
                [tokens[i] for i in keep], dtype=torch.long, device=runner.device
            )
            if len(keep) != len(group.rows):
                self.select_rows(group, keep)
            assert group.attention_mask is not None and group.next_pos is not None
            group.attention_mask = torch.cat(
                [group.attention_mask, group.attention_mask.new_ones((len(keep), 1))], dim=1
            )
            positions = group.next_pos.unsqueeze(1)
            logits, group.cache = runner.forward(
                next_tokens.unsqueeze(1), group.attention_mask, positions, group.cache, 1
            )
            group.logits = logits[:, -1].float()
            group.next_pos = group.next_pos + 1
            return finished

    def prefill(self, group: Group) -> None:
        """Left-padded forward of each distinct prompt once; the cache is then expanded to the
        group's rows (n samples of a prompt share its prefill)."""
        from transformers import DynamicCache

        device = self.runner.device
        keys: dict[tuple[int, int], int] = {}
        prompts: list[list[int]] = []
        row_src: list[int] = []
        for row in group.rows:
            key = (id(row.req), row.prompt_index)
            if key not in keys:
                keys[key] = len(prompts)
                prompts.append(row.prompt_ids)
            row_src.append(keys[key])
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        # Left padding: real tokens must still get positions 0..len-1.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.runner.model.config)
        logits, cache = self.runner.forward(ids, mask, positions, cache, 1)
        if self.observer is not None:
            self.observer("generate", len(group.rows))
        src = torch.tensor(row_src, dtype=torch.long, device=device)
        if row_src != list(range(len(prompts))):
            cache.batch_select_indices(src)
        group.cache = cache
        group.attention_mask = mask[src]
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        group.next_pos = lengths[src]
        group.logits = logits[:, -1].float()[src]
        group.params = RowSampling.from_specs(
            [row.req.spec for row in group.rows], self.runner.vocab_size, device
        )
        for row in group.rows:
            if row.req.spec.seed is not None:
                row.generator = torch.Generator(device=device).manual_seed(
                    row_seed(row.req.spec.seed, row.prompt_index, row.sample_index)
                )
        group.prefilled = True

    def select_rows(self, group: Group, keep: list[int]) -> None:
        """Keep only rows `keep` of every per-row tensor, the KV cache included."""
        group.rows = [group.rows[i] for i in keep]
        if not keep:
            group.cache = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.runner.device)
        group.cache.batch_select_indices(idx)
        assert group.attention_mask is not None and group.next_pos is not None
        assert group.logits is not None and group.params is not None
        group.attention_mask = group.attention_mask[idx]
        group.next_pos = group.next_pos[idx]
        group.logits = group.logits[idx]
        group.params.select(idx)

    # ------------------------------------------------------------------ stop rules

    def check_finished(self, row: Row) -> bool:
        """Apply the stop rules (vLLM's order) after the row's newest token."""
        spec = row.req.spec
        token = row.token_ids[-1]
        eos_ids = self.runner.eos_ids
        if not spec.ignore_eos and token in eos_ids:
            row.finish_reason = "stop"
            # vLLM: only the tokenizer's EOS is "eos"; other generation-config EOS ids act as
            # stop token ids and are reported as the stop reason.
            row.stop_reason = None if token == eos_ids[0] else token
            row.final_text = self._decode(row.token_ids[:-1])
            return True
        if token in spec.stop_token_ids:
            row.finish_reason, row.stop_reason = "stop", token
            row.final_text = self._decode(row.token_ids[:-1])
            return True
        if spec.stop:
            hit = self._find_stop(row)
            if hit is not None:
                row.finish_reason, row.stop_reason = "stop", hit
                cut = text_before_stop(self._decode(row.token_ids), spec.stop)
                # Full and incremental decodes disagree only on rare tokenizer quirks.
                row.final_text = cut if cut is not None else row.text[: row.text.rfind(hit)]
                return True
        if len(row.token_ids) >= row.max_new:
            row.finish_reason = "length"
            row.final_text = self._decode(row.token_ids)
            return True
        return False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _find_stop(self, row: Row) -> str | None:
        """Detokenize the newest token incrementally and look for a stop string that ends in
        the new text; of several, the one that completes earliest (ties: list order)."""
        ids = row.token_ids
        before = self._decode(ids[row.prefix_offset : row.read_offset])
        after = self._decode(ids[row.prefix_offset :])
        # Wait while the newest bytes are an incomplete UTF-8 character.
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None
        delta = after[len(before) :]
        row.prefix_offset, row.read_offset = row.read_offset, len(ids)
        row.text += delta
        best: str | None = None
        best_end = None
        for stop in row.req.spec.stop:
            at = row.text.find(stop, max(0, len(row.text) - len(delta) - len(stop) + 1))
            if at >= 0 and (best_end is None or at + len(stop) < best_end):
                best, best_end = stop, at + len(stop)
        return best
