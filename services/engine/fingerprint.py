"""Tokenizer fingerprint: one sha256 that two services compare before OPD may start.

OPD compares the teacher's and the student's logprobs of the *same token ids*, so both sides
must map ids to the same strings and render prompts the same way. The fingerprint hashes, in a
canonical JSON form that does not depend on file layout or key order:

- `vocab`: every `token -> id` pair (added tokens included), sorted by token;
- `model`: the tokenization model's type and, for BPE, its merges in rank order (read from the
  backend `tokenizers` JSON; old `"a b"` and new `["a", "b"]` spellings hash the same), for
  Unigram its piece scores;
- `added_tokens`: each added token's id, content and flags (special, lstrip, rstrip, normalized,
  single_word), sorted by id;
- `special_tokens`: the named special tokens (`eos_token`, `pad_token`, ...);
- `chat_template`: the template text (a dict of named templates is hashed key-sorted).

What is deliberately *not* hashed: `model_max_length`, padding side, and the normalizer /
pre-tokenizer / decoder pipelines (their JSON spelling varies across `tokenizers` releases
while the behaviour does not, and a real change there shows up in the vocab or merges).

`fingerprint_components` gives one hash per part so a caller that finds two fingerprints
different can say which part differs (`fingerprint_mismatch`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

COMPONENTS = ("vocab", "model", "added_tokens", "special_tokens", "chat_template")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


def _backend_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str())


def _normalize_merges(merges: list[Any]) -> list[list[str]]:
    out: list[list[str]] = []
    for merge in merges:
        if isinstance(merge, str):
            # Legacy spelling "a b": tokens never contain the separating space.
            left, _, right = merge.partition(" ")
            out.append([left, right])
        else:
            out.append([str(merge[0]), str(merge[1])])
    return out


def _model_part(tokenizer: Any) -> dict[str, Any]:
    data = _backend_json(tokenizer)
    if data is None:
        # A slow (Python) tokenizer: hash what it exposes. SentencePiece models carry their
        # pieces and scores in the serialized proto.
        part: dict[str, Any] = {"type": type(tokenizer).__name__}
        sp_model = getattr(tokenizer, "sp_model", None)
        if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
            part["sp_model_sha256"] = hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()
        return part
    model = data.get("model", {})
    part = {"type": model.get("type")}
    if "merges" in model:
        part["merges"] = _normalize_merges(model["merges"])
    if model.get("type") == "Unigram":
        part["pieces"] = model.get("vocab")
    for flag in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix",
                 "unk_token", "unk_id"):
        if flag in model:
            part[flag] = model[flag]
    return part


def _added_tokens_part(tokenizer: Any) -> list[dict[str, Any]]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out = []
    for token_id in sorted(decoder):
        tok = decoder[token_id]
        out.append(
            {
                "id": int(token_id),
                "content": str(getattr(tok, "content", tok)),
                "special": bool(getattr(tok, "special", False)),
                "lstrip": bool(getattr(tok, "lstrip", False)),
                "rstrip": bool(getattr(tok, "rstrip", False)),
                "normalized": bool(getattr(tok, "normalized", False)),
                "single_word": bool(getattr(tok, "single_word", False)),
            }
        )
    return out


def _special_tokens_part(tokenizer: Any) -> dict[str, Any]:
    mapping = getattr(tokenizer, "special_tokens_map", None) or {}
    out: dict[str, Any] = {}
    for name, value in mapping.items():
        if isinstance(value, list | tuple):
            out[name] = [str(v) for v in value]
        elif value is not None:
            out[name] = str(value)
    return out


def _chat_template_part(tokenizer: Any) -> Any:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return {str(k): str(v) for k, v in template.items()}
    return template


def _parts(tokenizer: Any) -> dict[str, Any]:
    vocab = tokenizer.get_vocab()
    return {
        "vocab": sorted((str(tok), int(idx)) for tok, idx in vocab.items()),
        "model": _model_part(tokenizer),
        "added_tokens": _added_tokens_part(tokenizer),
        "special_tokens": _special_tokens_part(tokenizer),
        "chat_template": _chat_template_part(tokenizer),
    }


def fingerprint_components(tokenizer: Any) -> dict[str, str]:
    """sha256 hex of each fingerprinted part (keys: `COMPONENTS`)."""
    return {name: hashlib.sha256(_canonical(value)).hexdigest() for name, value in _parts(tokenizer).items()}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex over vocabulary, merges, added/special tokens and chat template.

    Equal for the same tokenizer however it was loaded or copied; different when any token,
    merge, special token or the chat template changes.
    """
    return combine_components(fingerprint_components(tokenizer))


def combine_components(components: dict[str, str]) -> str:
    """The tokenizer fingerprint from its `fingerprint_components` (hash the parts once, get
    both)."""
    digest = hashlib.sha256()
    digest.update(b"opd-tokenizer-fingerprint-v1\n")
    for name in COMPONENTS:
        digest.update(f"{name}={components[name]}\n".encode())
    return digest.hexdigest()


def fingerprint_mismatch(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Names of the parts whose hashes differ between two `fingerprint_components` results."""
    return [name for name in COMPONENTS if a.get(name) != b.get(name)]
