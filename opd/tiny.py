"""Tiny models made from nothing: a byte-level BPE tokenizer and small random Llama models.

Tests, benchmarks and the offline smoke paths use them so nothing needs a download. Teacher
and student share one tokenizer (OPD compares logprobs of the same token ids).
"""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ravi", "Olga", "Ken"]
    things = ["apples", "books", "dollars", "eggs", "pens", "cookies", "marbles", "hours"]
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        who, what = rng.choice(names), rng.choice(things)
        lines.append(
            f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have? "
            f"{who} has {a} + {b} = {a + b} {what}. The answer is \\boxed{{{a + b}}}. #### {a + b}"
        )
    lines.append("You are a helpful assistant. Please reason step by step, and put your final "
                 "answer within \\boxed{}.")
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer with a ChatML template; save and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int | None = None,
    max_position_embeddings: int = 1024,
) -> Path:
    """Save a random tiny Llama (float32) with the tokenizer next to it; returns the directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = (
        AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if tokenizer_dir is not None
        else build_tokenizer(out)
    )
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so the random models disagree visibly (KL well above zero).
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    return out
