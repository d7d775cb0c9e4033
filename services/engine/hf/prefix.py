"""Prefix sharing in the hf backend's scoring: a prefix common to several sequences runs once.

The trainer's sequences share long prefixes (a few-shot teacher context before every question;
the `n` samples of one prompt share the whole prompt). Scoring each from its first token
repeats that work per sequence. Here:

1. `pack_shared` (scheduler side) sorts the queued sequences by their *shareable part*
   `token_ids[:start - 1]` and cuts them into chunks; sequences that share fewer than
   `MIN_SHARED` tokens with every other one go to the plain path (`scoring.pack_batches`).
2. `score_shared` builds a radix tree over the chunk's shareable parts (`build_tree`): each
   inner node is a run of tokens common to >= 2 sequences (at least `MIN_SHARED` long), a
   leaf is one sequence's remaining tokens. Nodes run level by level (all nodes of a level
   in padded batches), each row continuing from its ancestors' KV cache (a transformers
   `DynamicCache` filled per row); only the keys/values of a node are kept. Then each leaf
   runs on its ancestors' cache, and logits are computed from `start - 1` on only.

Exactness: every position from `start - 1` on (the one predicting the first scored token
included) is always in the leaf, so every scored logit comes from a forward of the leaf's
own tokens over the cached keys/values of the prefix: the same math as the plain path, equal
to float32 rounding (batch shapes differ, so summation order may). Padding (ragged prefixes
and ragged new tokens in one batch) is masked out through the attention mask.

Memory: a chunk keeps the keys/values of its inner nodes, at most `max_batch_tokens` tokens
(each shared token counted once); every forward stays within `max_batch_tokens` padded
tokens counting, per row, its (padded) prefix, whose keys/values are copied into the row's
cache, plus its new tokens. A single row longer than that runs alone, as in the plain path.

Models whose cache is not plain full attention (sliding-window, chunked or recurrent layers)
keep the plain path (`ModelRunner.prefix_cache_ok`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..base import ScoreInput, ScoreResult
from .model import ModelRunner
from .scoring import pack_batches, score_padded, sequence_result

# Shortest run of tokens worth a node of its own (a node costs one more forward level).
MIN_SHARED = 32

_Item = TypeVar("_Item")


@dataclass(eq=False)
class Node:
    """Tokens `offset .. offset + len(tokens)` common to >= 2 sequences of a chunk."""

    tokens: list[int]
    offset: int  # position of tokens[0] = the length of everything above it
    parent: Node | None
    level: int  # 1 for a child of the root
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [heads, len, dim]

    @property
    def end(self) -> int:
        return self.offset + len(self.tokens)


@dataclass(eq=False)
class Leaf:
    """One sequence: its tokens after `parent` (the last one, which predicts nothing, left
    out); `first` is the index in `tokens` of position `start - 1`."""

    index: int
    parent: Node | None
    tokens: list[int]
    first: int

    @property
    def offset(self) -> int:
        return self.parent.end if self.parent is not None else 0


def _lcp(a: list[int], b: list[int], lo: int) -> int:
    """The length of the common prefix of `a` and `b`, known to be at least `lo`."""
    n = min(len(a), len(b))
    if n <= lo:
        return n
    diff = np.flatnonzero(np.asarray(a[lo:n]) != np.asarray(b[lo:n]))
    return lo + int(diff[0]) if diff.size else n


def _key(inp: ScoreInput) -> list[int]:
    """The part of a sequence another may share: everything before position `start - 1`."""
    return inp.token_ids[: inp.start - 1]


def build_tree(
    inputs: Sequence[ScoreInput], min_shared: int = MIN_SHARED
) -> tuple[list[Node], list[Leaf]]:
    """The radix tree of the inputs' shareable parts: inner nodes of >= `min_shared` tokens
    shared by >= 2 inputs, and one leaf per input."""
    keys = [_key(inp) for inp in inputs]
    nodes: list[Node] = []
    leaves: list[Leaf] = []

    def leaf(i: int, parent: Node | None, depth: int) -> None:
        inp = inputs[i]
        leaves.append(
            Leaf(
                index=i, parent=parent, tokens=inp.token_ids[depth:-1], first=inp.start - 1 - depth
            )
        )

    # (members in lexicographic order, depth they all share, the node that ends at depth)
    stack: list[tuple[list[int], int, Node | None]] = [
        (sorted(range(len(inputs)), key=keys.__getitem__), 0, None)
    ]
    while stack:
        group, depth, parent = stack.pop()
        if len(group) == 1:
            leaf(group[0], parent, depth)
            continue
        # sorted: the group's common prefix is that of its first and last member
        split = _lcp(keys[group[0]], keys[group[-1]], depth)
        if split - depth >= min_shared:
            parent = Node(
                tokens=keys[group[0]][depth:split],
                offset=depth,
                parent=parent,
                level=parent.level + 1 if parent is not None else 1,
            )
            nodes.append(parent)
            depth = split
        run: list[int] = []
        for i in group:
            if len(keys[i]) == split:  # sorts first: ends here
                leaf(i, parent, depth)
            elif run and keys[run[0]][split] != keys[i][split]:
                stack.append((run, depth, parent))
                run = [i]
            else:
                run.append(i)
        if run:
            stack.append((run, depth, parent))
    return nodes, leaves


def pack_shared(
    items: Sequence[_Item],
    inp: Callable[[_Item], ScoreInput],
    max_batch_tokens: int,
    min_shared: int = MIN_SHARED,
) -> list[list[_Item]]:
    """Batches for `score_shared`: chunks of sequences sharing prefixes (sorted, each chunk's
    distinct shareable tokens <= `max_batch_tokens`), then the rest packed by length."""
    ordered = sorted(items, key=lambda it: _key(inp(it)))
    keys = [_key(inp(it)) for it in ordered]
    lcp = [0] + [_lcp(keys[i - 1], keys[i], 0) for i in range(1, len(keys))]
    shares = [
        max(lcp[i], lcp[i + 1] if i + 1 < len(keys) else 0) >= min_shared for i in range(len(keys))
    ]
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    distinct = 0
    previous: list[int] | None = None
    for item, key, share in zip(ordered, keys, shares, strict=True):
        if not share:
            continue
        added = len(key) - (_lcp(previous, key, 0) if previous is not None else 0)
        if current and distinct + added > max_batch_tokens:
            chunks.append(current)
            current, distinct, added = [], 0, len(key)
        current.append(item)
        distinct += added
        previous = key
    if current:
        chunks.append(current)
    plain = [it for it, share in zip(ordered, shares, strict=True) if not share]
    return chunks + pack_batches(plain, lambda it: len(inp(it).token_ids), max_batch_tokens)


def _pack_rows(rows: list[Node] | list[Leaf], max_batch_tokens: int) -> list[list]:
    """Sort rows by (prefix, new tokens) and cut into batches of <= `max_batch_tokens`
    padded tokens, counting each row's padded prefix and padded new tokens."""
    batches: list[list] = []
    current: list = []
    past_w = new_w = 0
    for row in sorted(rows, key=lambda r: (r.offset, len(r.tokens))):
        p, n = max(past_w, row.offset), max(new_w, len(row.tokens))
        if current and (len(current) + 1) * (p + n) > max_batch_tokens:
            batches.append(current)
            current, p, n = [], row.offset, len(row.tokens)
        current.append(row)
        past_w, new_w = p, n
    if current:
        batches.append(current)
    return batches


def _ancestors(node: Node | None) -> list[Node]:
    chain: list[Node] = []
    while node is not None:
        chain.append(node)
        node = node.parent
    return chain[::-1]


def _forward(runner: ModelRunner, rows: list[Node] | list[Leaf], keep: int):
    """One padded forward of `rows`' new tokens over their ancestors' keys/values.

    Returns (logits of the last `keep` positions, the cache, the padded prefix width)."""
    from transformers import DynamicCache

    device = runner.device
    past_w = max(r.offset for r in rows)
    new_w = max(len(r.tokens) for r in rows)
    ids = torch.zeros((len(rows), new_w), dtype=torch.long)
    mask = torch.zeros((len(rows), past_w + new_w), dtype=torch.long)
    positions = torch.zeros((len(rows), new_w), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        mask[i, : r.offset] = 1
        mask[i, past_w : past_w + len(r.tokens)] = 1
        positions[i] = torch.arange(r.offset, r.offset + new_w)
    # padding positions stay inside the model's range (they are masked out anyway)
    positions.clamp_(max=runner.max_model_len - 1)
    cache = DynamicCache(config=runner.model.config)
    if past_w:
        parents = [r.parent for r in rows]
        chains = {id(p): _ancestors(p) for p in parents}
        n_layers = len(next(p for p in parents if p is not None).kv)
        for layer in range(n_layers):
            ref_k, ref_v = next(p for p in parents if p is not None).kv[layer]
            heads, _, dim = ref_k.shape
            k = ref_k.new_zeros((len(rows), heads, past_w, dim))
            v = ref_v.new_zeros((len(rows), ref_v.shape[0], past_w, ref_v.shape[2]))
            for i, p in enumerate(parents):
                for node in chains[id(p)]:
                    nk, nv = node.kv[layer]
                    k[i, :, node.offset : node.end] = nk
                    v[i, :, node.offset : node.end] = nv
            cache.update(k, v, layer)
    logits, cache = runner.forward(
        ids.to(device), mask.to(device), positions.to(device), cache, keep
    )
    return logits, cache, past_w


def score_shared(
    runner: ModelRunner,
    inputs: list[ScoreInput],
    max_batch_tokens: int,
    observer: Callable[[str, int], None] | None = None,
) -> list[ScoreResult]:
    """Score `inputs`, computing each prefix shared by several of them once (see the module
    docstring). Blocking (run it in a worker thread); holds the runner's lock throughout."""
    nodes, leaves = build_tree(inputs) if runner.prefix_cache_ok else ([], [])
    results: list[ScoreResult | None] = [None] * len(inputs)
    with runner.lock, torch.inference_mode():
        runner.check_alive()
        for level in sorted({n.level for n in nodes}):
            for batch in _pack_rows([n for n in nodes if n.level == level], max_batch_tokens):
                _, cache, past_w = _forward(runner, batch, 1)
                for i, node in enumerate(batch):
                    span = slice(past_w, past_w + len(node.tokens))
                    node.kv = [
                        (layer.keys[i, :, span].clone(), layer.values[i, :, span].clone())
                        for layer in cache.layers
                    ]
                del cache
        shared = [leaf for leaf in leaves if leaf.parent is not None]
        for batch in _pack_rows(shared, max_batch_tokens):
            new_w = max(len(leaf.tokens) for leaf in batch)
            keep = new_w - min(leaf.first for leaf in batch)
            logits, _, _ = _forward(runner, batch, keep)
            if observer is not None:
                observer("score", len(batch))
            for i, leaf in enumerate(batch):
                inp = inputs[leaf.index]
                first = leaf.first - (new_w - keep)
                rows = logits[i, first : first + len(inp.token_ids) - inp.start]
                targets = torch.tensor(
                    inp.token_ids[inp.start :], dtype=torch.long, device=rows.device
                )
                results[leaf.index] = sequence_result(rows, targets, inp)
            del logits
        plain = [i for i in range(len(inputs)) if results[i] is None]
        for batch in pack_batches(plain, lambda i: len(inputs[i].token_ids), max_batch_tokens):
            for i, result in zip(
                batch, score_padded(runner, [inputs[i] for i in batch], observer), strict=True
            ):
                results[i] = result
    return results  # type: ignore[return-value]
