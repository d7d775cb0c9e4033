"""Generation in the vllm backend: sampling requests, their samples, and the final text.

One vLLM request per prompt with `n` samples (vLLM gives sample `i` of a seeded request the
seed `seed + i`). `logprobs[i]` is the processed logprob of `token_ids[i]`: under
`log_softmax(filtered(logits / T))`, i.e. exactly the distribution sampled from; with the
trainer's `top_p=1, top_k=-1` that is `log_softmax(logits / T)`. Temperature 0 is greedy and
reports `log_softmax(logits)` (vLLM skips temperature for greedy rows). `top_logprobs`
alternatives are the top entries of the same distribution.

Stopping is vLLM's: EOS (unless `ignore_eos`) and `stop_token_ids` are included in
`token_ids` (`stop_reason` None for the tokenizer's EOS, the id otherwise); a stop string
cuts `text` before it while `token_ids` keep every token up to the one completing it;
`max_tokens` or reaching `max_model_len` -> `length`. `text` is the tokenizer's full decode
of `token_ids` (special tokens skipped; a stop token left out; cut before a stop string), as
in the hf backend: vLLM's own incremental text drops a trailing incomplete UTF-8 character,
so it is only used to find stop strings. Temperatures in (0, 0.01) and above 2 are refused
(`EngineRequestError`) for the same reason as in scoring (see `requests`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..base import GeneratedSample, SamplingSpec
from ..stop_strings import text_before_stop
from ..tokenization import decode
from .requests import RequestRunner, gather_or_cancel

if TYPE_CHECKING:
    from vllm import RequestOutput


async def generate_samples(
    requests: RequestRunner, tokenizer: Any, checked: list[list[int]], spec: SamplingSpec
) -> list[list[GeneratedSample]]:
    """`spec.n` samples for each checked prompt; outer list follows `checked`."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # vLLM refuses greedy sampling with n > 1; n greedy samples are one sample n times.
    greedy_copies = spec.n if spec.temperature == 0 and spec.n > 1 else 1
    params = SamplingParams(
        n=spec.n // greedy_copies,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=max(spec.top_k, 0),  # vLLM: 0 (or -1) means no top-k filter
        seed=spec.seed,
        stop=list(spec.stop) or None,
        stop_token_ids=list(spec.stop_token_ids) or None,
        ignore_eos=spec.ignore_eos,
        logprobs=spec.top_logprobs,  # 0: just the sampled token's logprob
        flat_logprobs=True,
        # vLLM needs its own text only to find stop strings; `text` is decoded here.
        detokenize=bool(spec.stop),
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    kind = "top_k" if spec.top_logprobs else "plain"
    async with requests.kinds.hold(kind):
        outputs = await gather_or_cancel(
            requests.run(ids, params, f"prompts[{i}]") for i, ids in enumerate(checked)
        )
    results = [samples(tokenizer, out, spec, f"prompts[{i}]") for i, out in enumerate(outputs)]
    if greedy_copies > 1:
        results = [[copy.deepcopy(s[0]) for _ in range(greedy_copies)] for s in results]
    return results


def final_text(tokenizer: Any, token_ids: list[int], finish_reason: str, stop_reason: Any,
               vllm_text: str, stops: Sequence[str]) -> str:
    """The sample's text exactly as the hf backend (and `tokenization.decode`) gives it.

    vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 character, so
    its `text` can differ from a plain decode of the same ids; the full decode is the
    contract. As in vLLM: a stop token (EOS or `stop_token_ids`) is left out of the text,
    and a stop string cuts the text before it (the earliest-completing one).
    """
    if finish_reason == "stop" and not isinstance(stop_reason, str):
        return decode(tokenizer, token_ids[:-1])
    full = decode(tokenizer, token_ids)
    if finish_reason == "stop":
        cut = text_before_stop(full, stops)
        # Not found only if the full and incremental decodes disagree: trust vLLM's.
        return cut if cut is not None else vllm_text
    return full


def samples(
    tokenizer: Any, out: RequestOutput, spec: SamplingSpec, where: str
) -> list[GeneratedSample]:
    """The `GeneratedSample`s of one finished request, in sample order."""
    result = []
    for completion in sorted(out.outputs, key=lambda c: c.index):
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(
                f"{where}: sample {completion.index} ended with {completion.finish_reason!r}"
            )
        token_ids = [int(t) for t in completion.token_ids]
        flat = completion.logprobs
        if flat is None or len(flat.start_indices) != len(token_ids):
            raise RuntimeError(f"{where}: vLLM returned no logprobs for every token")
        logprobs: list[float] = []
        top: list[dict[int, float]] | None = [] if spec.top_logprobs else None
        for pos, token in enumerate(token_ids):
            # Each position is [sampled token, top-1 .. top-k].
            s, e = flat.start_indices[pos], flat.end_indices[pos]
            if flat.token_ids[s] != token:
                raise RuntimeError(f"{where}: logprob of token {pos} is not the sampled one")
            logprobs.append(float(flat.logprobs[s]))
            if top is not None:
                top.append(
                    {int(flat.token_ids[i]): float(flat.logprobs[i]) for i in range(s + 1, e)}
                )
        result.append(
            GeneratedSample(
                token_ids=token_ids,
                logprobs=logprobs,
                text=final_text(tokenizer, token_ids, completion.finish_reason,
                                completion.stop_reason, completion.text, spec.stop),
                finish_reason=completion.finish_reason,
                top_logprobs=top,
                stop_reason=completion.stop_reason,
            )
        )
    return result
