"""The teacher's own prompt (``teacher.context``): what it contains, that the teacher service's
scores of the student's completion after it equal a direct forward of that prompt plus the
completion (every context kind), and that the prompt budget counts the longer prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.servers import start_server
from trainer.batches import Rollout, score_rollouts
from trainer.clients import TeacherClient
from trainer.config import load_config
from trainer.config_sections import TeacherContextConfig
from trainer.data import SYSTEM_PROMPT, Example, build_messages
from trainer.errors import StartupError
from trainer.startup import load_prompts
from trainer.teacher_context import TeacherContext, chat_ids, format_solution, split_few_shot


def _examples(n: int, start: int = 0) -> list[Example]:
    out = []
    for i in range(start, start + n):
        a, b = i + 2, 2 * i + 3
        out.append(
            Example(
                index=i,
                question=f"Tom has {a} apples and buys {b} more. How many apples?",
                answer=f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
                ground_truth=str(a + b),
            )
        )
    return out


def test_format_solution_drops_calculator_notes_and_boxes_the_answer() -> None:
    got = format_solution(
        "She has 3 * 4 = <<3*4=12>>12 eggs.\nThen 12 + 1,000 = 1,012.\n#### 1,012"
    )
    assert (
        got
        == "She has 3 * 4 = 12 eggs.\nThen 12 + 1,000 = 1,012.\nThe final answer is \\boxed{1012}."
    )
    with pytest.raises(ValueError, match="####"):
        format_solution("no final answer")


def test_few_shot_problems_come_first_and_are_never_trained_on() -> None:
    shots, rest = split_few_shot(_examples(5), 2)
    assert [e.index for e in shots] == [0, 1] and [e.index for e in rest] == [2, 3, 4]
    with pytest.raises(ValueError, match="few_shot is 9"):
        split_few_shot(_examples(5), 9)


@pytest.mark.parametrize(
    "context",
    [
        {"system": "You are a careful math teacher."},
        {"few_shot": 2},
        {"reference_solution": True},
        {"few_shot": 1, "reference_solution": True, "system": "Teacher."},
    ],
    ids=["system", "few_shot", "reference_solution", "all"],
)
def test_messages_of_each_context_kind(tiny_models, context: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    cfg = TeacherContextConfig(**context)
    shots = _examples(cfg.few_shot, start=100)
    ctx = TeacherContext(cfg, shots, tok)
    ex = _examples(1)[0]
    msgs = ctx.messages(ex)
    assert msgs[0] == {"role": "system", "content": cfg.system or SYSTEM_PROMPT}
    assert len(msgs) == 2 + 2 * cfg.few_shot
    for i, shot in enumerate(shots):
        assert shot.question in msgs[1 + 2 * i]["content"]
        assert msgs[2 + 2 * i] == {"role": "assistant", "content": format_solution(shot.answer)}
    assert ex.question in msgs[-1]["content"]
    assert (format_solution(ex.answer) in msgs[-1]["content"]) == cfg.reference_solution
    student_ids = chat_ids(tok, build_messages(ex.question))
    teacher_ids = ctx.prompt_ids(ex, student_ids)
    assert teacher_ids == chat_ids(tok, msgs) and teacher_ids != student_ids
    # Inactive: the rollout's own prompt ids, untouched.
    assert TeacherContext(TeacherContextConfig(), []).prompt_ids(ex, [7, 8]) == [7, 8]


@pytest.mark.parametrize("reference_solution", [False, True])
def test_a_train_and_a_test_problem_with_the_same_index_get_their_own_prompts(
    tiny_models, reference_solution: bool
) -> None:
    """``Example.index`` is a position in its split: train problem 0 and test problem 0 both
    have index 0. The trainer builds the teacher prompts of every training problem at start,
    then of the held-out ones; each must get its own question (and solution)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    cfg = TeacherContextConfig(few_shot=1, reference_solution=reference_solution)
    ctx = TeacherContext(cfg, _examples(1, start=100), tok)
    train_ex = _examples(1)[0]
    test_ex = Example(
        index=train_ex.index,
        question="A train leaves at 3 and arrives at 5. How long is the trip?",
        answer="5 - 3 = <<5-3=2>>2 hours.\n#### 2",
        ground_truth="2",
    )
    for ex in (train_ex, test_ex):
        student_ids = chat_ids(tok, build_messages(ex.question))
        assert ctx.prompt_ids(ex, student_ids) == chat_ids(tok, ctx.messages(ex))
    # Same question, another solution: a different prompt only when the solution is shown.
    other = Example(train_ex.index, train_ex.question, "1 + 1 = 2.\n#### 2", "2")
    same = ctx.prompt_ids(other, []) == ctx.prompt_ids(train_ex, [])
    assert same != reference_solution


@pytest.fixture(scope="module")
def teacher_url(tiny_models):
    args = [
        "--model",
        str(tiny_models["teacher"]),
        "--backend",
        "hf",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--max-model-len",
        "1024",
        "--max-top-k",
        "8",
    ]
    with start_server("services.teacher", args) as srv:
        yield srv.base_url


@pytest.mark.parametrize(
    "context",
    [{"system": "You are a careful math teacher."}, {"few_shot": 2}, {"reference_solution": True}],
    ids=["system", "few_shot", "reference_solution"],
)
def test_scores_after_the_context_equal_a_direct_forward(
    tiny_models, teacher_url, context: dict
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    overrides = [f"teacher.context.{k}={v}" for k, v in context.items()]
    cfg = load_config(None, ["student.model=s", "algorithm.teacher_top_k=4", *overrides])
    ctx = TeacherContext(cfg.teacher.context, _examples(cfg.teacher.context.few_shot, 50), tok)
    examples = _examples(2)
    rng = np.random.default_rng(0)
    rollouts = []
    for i, ex in enumerate(examples):
        prompt = np.asarray(chat_ids(tok, build_messages(ex.question)), np.int64)
        response = rng.integers(3, tok.vocab_size, size=12 + i)
        rollouts.append(Rollout(i, None, prompt, response, np.zeros(len(response), np.float32)))  # type: ignore[arg-type]

    client = TeacherClient("teacher", teacher_url)
    try:
        scores = score_rollouts(cfg, client, rollouts, examples, ctx)
    finally:
        client.close()

    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    for x, ex, sc in zip(rollouts, examples, scores, strict=True):
        prompt = ctx.prompt_ids(ex, x.prompt_ids)
        assert len(prompt) > len(x.prompt_ids) or context.get("system")
        ids = torch.tensor([prompt + x.response_ids.tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        rows = logp[len(prompt) - 1 : -1]
        want = rows.gather(1, torch.from_numpy(x.response_ids)[:, None])[:, 0]
        np.testing.assert_allclose(sc.logprobs, want.numpy(), atol=1e-4)
        top = rows.topk(4, dim=-1)
        np.testing.assert_allclose(sc.top_logprobs, top.values.numpy(), atol=1e-4)
        np.testing.assert_array_equal(sc.top_ids, top.indices.numpy())


def _prompt_cfg(gsm8k_dir, *extra: str):
    return load_config(
        None,
        [
            "student.model=s",
            f"data.source={gsm8k_dir}",
            "data.train_limit=40",
            "rollout.max_tokens=64",
            "eval.max_tokens=32",
            "rollout.prompts_per_step=4",
            *extra,
        ],
    )


def test_load_prompts_sets_the_shots_aside_and_counts_the_teacher_prompt(
    tiny_models, gsm8k_dir
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    plain = load_prompts(_prompt_cfg(gsm8k_dir, "trainer.max_model_len=4096"), tok, True)
    shots = load_prompts(
        _prompt_cfg(gsm8k_dir, "trainer.max_model_len=4096", "teacher.context.few_shot=3"),
        tok,
        True,
    )
    assert plain.sampler.num_examples == 40 and shots.sampler.num_examples == 37
    trained = {ex.index for ex in shots.sampler.epoch_order(0)}
    assert trained.isdisjoint({ex.index for ex in shots.teacher_context.shots})

    # A budget the student's prompts fit but some teacher prompts do not: those are dropped.
    context_len = shots.teacher_context.context_tokens()
    budget = context_len + 64 + 420
    tight = load_prompts(
        _prompt_cfg(
            gsm8k_dir,
            f"trainer.max_model_len={budget}",
            "teacher.context.few_shot=3",
            f"trainer.micro_batch_tokens={budget}",
        ),
        tok,
        True,
    )
    assert 0 < tight.sampler.num_examples < 37
    for ex in tight.sampler.epoch_order(0):
        student = chat_ids(tok, build_messages(ex.question))
        assert len(tight.teacher_context.prompt_ids(ex, student)) <= budget - 64

    # A context that leaves no room for any question is a clear start-up error.
    with pytest.raises(StartupError, match=r"teacher\.context.*leaves no room"):
        load_prompts(
            _prompt_cfg(gsm8k_dir, "trainer.max_model_len=512", "teacher.context.few_shot=3"),
            tok,
            True,
        )
