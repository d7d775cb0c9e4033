"""Tokenizer fingerprint: stable for the same tokenizer, sensitive to every part it covers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.engine.fingerprint import (
    fingerprint_components,
    fingerprint_mismatch,
    tokenizer_fingerprint,
)


def _load(path: Path):
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture()
def tok_copy(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny tokenizer directory, free to edit."""
    dst = tmp_path / "tok"
    shutil.copytree(tiny_models["tokenizer"], dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_same_tokenizer_same_fingerprint(tiny_models, tok_copy, tmp_path):
    a = tokenizer_fingerprint(_load(tiny_models["tokenizer"]))
    assert len(a) == 64 and int(a, 16) >= 0
    assert tokenizer_fingerprint(_load(tiny_models["tokenizer"])) == a  # loaded twice
    assert tokenizer_fingerprint(_load(tok_copy)) == a  # a copy of the directory
    assert tokenizer_fingerprint(_load(tiny_models["student"])) == a  # saved beside a model
    _load(tok_copy).save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_fingerprint(_load(tmp_path / "resaved")) == a  # re-saved


def _changed_parts(base_dir: Path, edited_dir: Path) -> list[str]:
    a, b = _load(base_dir), _load(edited_dir)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    return fingerprint_mismatch(fingerprint_components(a), fingerprint_components(b))


def test_token_change_changes_fingerprint(tiny_models, tok_copy):
    def swap(data):
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # one token now has another id

    _edit_json(tok_copy / "tokenizer.json", swap)
    assert _changed_parts(tiny_models["tokenizer"], tok_copy) == ["vocab"]


def test_added_token_changes_fingerprint(tiny_models):
    tok = _load(tiny_models["tokenizer"])
    before = tokenizer_fingerprint(tok)
    tok.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(tok) != before


def test_merge_change_changes_fingerprint(tiny_models, tok_copy):
    _edit_json(tok_copy / "tokenizer.json", lambda d: d["model"]["merges"].pop())
    assert _changed_parts(tiny_models["tokenizer"], tok_copy) == ["model"]


def test_legacy_merge_spelling_is_equivalent(tiny_models, tok_copy):
    def legacy(data):
        data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]

    _edit_json(tok_copy / "tokenizer.json", legacy)
    assert tokenizer_fingerprint(_load(tok_copy)) == tokenizer_fingerprint(_load(tiny_models["tokenizer"]))


def test_special_token_change_changes_fingerprint(tiny_models, tok_copy):
    _edit_json(tok_copy / "tokenizer_config.json", lambda d: d.update(eos_token="<|endoftext|>"))
    assert "special_tokens" in _changed_parts(tiny_models["tokenizer"], tok_copy)


def test_special_flag_change_changes_fingerprint(tiny_models, tok_copy):
    def unspecial(data):
        data["added_tokens"][1]["special"] = False

    _edit_json(tok_copy / "tokenizer.json", unspecial)
    assert "added_tokens" in _changed_parts(tiny_models["tokenizer"], tok_copy)


def test_new_special_token_changes_fingerprint(tiny_models):
    tok = _load(tiny_models["tokenizer"])
    before = fingerprint_components(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    after = fingerprint_components(tok)
    assert "added_tokens" in fingerprint_mismatch(before, after)


def test_chat_template_change_changes_fingerprint(tiny_models, tok_copy):
    template = tok_copy / "chat_template.jinja"
    if template.exists():
        template.write_text(template.read_text().replace("assistant", "assistant "))
    else:  # template stored in tokenizer_config.json
        _edit_json(
            tok_copy / "tokenizer_config.json",
            lambda d: d.update(chat_template=d["chat_template"].replace("assistant", "assistant ")),
        )
    assert _changed_parts(tiny_models["tokenizer"], tok_copy) == ["chat_template"]
