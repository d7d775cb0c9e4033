"""Tokenizer helpers shared by both engine backends and the services.

Every place that turns a request into token ids goes through these functions, so the teacher,
the rollout service and both backends agree on exactly which ids a prompt becomes:

- chat prompts: the chat template is rendered to text with the generation prompt, then that
  text is encoded with `add_special_tokens=False` (the template already writes any BOS);
  this is what vLLM's chat endpoint does;
- text prompts: encoded with `add_special_tokens=True` (BOS where the tokenizer adds one), as
  vLLM's completions endpoint does;
- prompt + completion pairs (teacher `/v1/score` text forms): the prompt and the completion are
  encoded separately and concatenated, so the boundary is exact and the completion's tokens are
  the ones a student sampling after that prompt could have produced (a joint encoding could merge
  a token across the boundary).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import EngineConfig


def load_tokenizer(config: EngineConfig) -> Any:
    """Load the tokenizer named by `config.tokenizer` (default: `config.model`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        config.tokenizer or config.model, trust_remote_code=config.trust_remote_code
    )


def _flatten_content(content: Any) -> str:
    """OpenAI multi-part content -> plain text (text parts joined; other parts dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if isinstance(part, Mapping):
            if part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        elif isinstance(part, str):
            parts.append(part)
    return "".join(parts)


def normalize_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Chat messages (dicts or pydantic models) -> plain dicts with string `content`.

    Extra keys (e.g. `name`, `tool_calls`) are kept for templates that use them; `None` values
    are dropped so templates testing `message.get(...)` behave as with a hand-written dict.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if hasattr(message, "model_dump"):
            data = message.model_dump(exclude_none=True)
        elif isinstance(message, Mapping):
            data = {k: v for k, v in message.items() if v is not None}
        else:
            raise TypeError(f"a chat message must be a mapping, got {type(message).__name__}")
        data["content"] = _flatten_content(data.get("content"))
        out.append(data)
    return out


def render_chat(tokenizer: Any, messages: Iterable[Any], *, add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages`, as text (generation prompt appended by default)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; send a text prompt or token ids")
    text = tokenizer.apply_chat_template(
        normalize_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # defensive: some versions wrap a single conversation
        text = text[0]
    return text


def chat_prompt_ids(tokenizer: Any, messages: Iterable[Any]) -> list[int]:
    """Token ids of the chat template with the generation prompt (no extra special tokens)."""
    return encode_text(tokenizer, render_chat(tokenizer, messages), add_special_tokens=False)


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Plain text -> token ids (`add_special_tokens=True` adds BOS where the tokenizer does)."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return [int(i) for i in ids]


def text_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A raw text prompt -> token ids, as vLLM's completions endpoint encodes it."""
    return encode_text(tokenizer, text, add_special_tokens=True)


def prompt_completion_ids(
    tokenizer: Any, prompt_ids: Sequence[int], completion: str
) -> tuple[list[int], int]:
    """`(prompt_ids + completion_ids, start)` with the completion encoded on its own.

    `start = len(prompt_ids)` is the index of the first completion token, ready for scoring.
    """
    completion_ids = encode_text(tokenizer, completion, add_special_tokens=False)
    return [int(i) for i in prompt_ids] + completion_ids, len(prompt_ids)


def resolve_eos_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The token ids that end a generation: the tokenizer's EOS first, then any other EOS ids of
    the model's generation config (e.g. Qwen lists both `<|im_end|>` and `<|endoftext|>`).

    Duplicates are removed; order is kept so `ids[0]` is the tokenizer's own EOS when it has one.
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        if isinstance(value, int):
            if value not in ids:
                ids.append(int(value))
            return
        for v in value:
            add(v)

    add(getattr(tokenizer, "eos_token_id", None))
    if generation_config is not None:
        add(getattr(generation_config, "eos_token_id", None))
    return ids


def decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Token ids -> text the way completions are shown: special tokens skipped."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
