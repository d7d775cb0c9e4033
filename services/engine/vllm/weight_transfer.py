"""The broadcast transport inside vLLM's worker process: a `WeightTransferEngine` of vLLM's API.

vLLM builds it in its worker when the engine starts with
`weight_transfer_config=WeightTransferConfig(backend="opd_broadcast")` (the rollout service's
vllm engine does, `startup.engine_args`; `plugin` registers the class in every vLLM process),
and the service drives it through `AsyncLLM.init_weight_transfer_engine`,
`start_weight_update` / `update_weights` / `finish_weight_update` and
`shutdown_weight_transfer_engine` (`services.engine.vllm.broadcast`). It speaks the rollout
service's broadcast protocol, not vLLM's NCCL one, so the trainer's `BroadcastSender` feeds hf
and vllm replicas alike, over gloo or NCCL:

- init: join the trainer's group exactly as an hf replica does (`broadcast_group.join_group`:
  the trainer's TCPStore, a PrefixStore per group, a ProcessGroupGloo / ProcessGroupNCCL of
  its own), replacing any earlier group;
- update `receive`: check the manifest against the initial checkpoint's names, shapes and
  dtypes (its safetensors headers, `services.engine.checkpoint`), receive every bucket into
  CPU staging tensors (`broadcast_group.receive_buckets`), check that tied embeddings hold
  equal values. The model is not touched, so a transfer cut off anywhere changes nothing;
- update `load`: only now does the model change, through vLLM's in-place reload
  (`reload_weights` with the staged tensors as its iterator: the layerwise reload the disk
  path runs too). The tensors are then kept (CPU memory, one model's worth) as what a later
  failed load restores (`restore`), since no directory holds them; `forget` drops them once
  weights from disk serve, `discard` drops staging that will not be loaded;
- start / finish: nothing to do (each session carries one action).

A misfit raises with the `REFUSED` prefix (the service raises `WeightsError`); anything else
is a transport or load failure. A failed receive drops the group, as an hf replica does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from services.engine.base import WeightsError
from services.engine.checkpoint import CheckpointSpec, check_layout, reference_checkpoint
from services.protocol import BroadcastInitRequest, BroadcastRequest
from services.student_rollout.broadcast_group import join_group, receive_buckets

from .transfer_wire import (
    ACTIONS,
    REFUSED,
    Discard,
    Forget,
    JoinInfo,
    Load,
    Receive,
    Restore,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.weight_transfer import WeightTransferConfig

# A child of vLLM's logger: vLLM configures its handlers in the worker process.
logger = logging.getLogger("vllm.opd_broadcast")

Action = Receive | Load | Restore | Discard | Forget


class BroadcastWeightTransferEngine(WeightTransferEngine[Any, Any]):
    """Receives a rollout-service broadcast into staging; loads it only when told to."""

    init_info_cls = JoinInfo
    update_info_cls = Receive  # one of several actions: `parse_update_info` is overridden
    supports_draft_weight_update = False

    def __init__(
        self,
        config: WeightTransferConfig,
        vllm_config: VllmConfig,
        device: torch.device,
        model: torch.nn.Module,
    ) -> None:
        super().__init__(config, vllm_config, device, model)
        # vLLM's disk reload repoints model_config.model at each directory it loads; updates
        # are checked against the checkpoint the engine started from, so remember that one.
        self._initial_model = str(vllm_config.model_config.model)
        self._spec: CheckpointSpec | None = None
        self._init: BroadcastInitRequest | None = None
        self._store: Any = None
        self._group: Any = None
        self._staged: dict[str, torch.Tensor] | None = None
        self._kept: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- vLLM's interface

    def parse_init_info(self, init_dict: dict[str, Any]) -> JoinInfo:
        """The join request (pydantic: a bad payload is a `ValueError` naming the field)."""
        return JoinInfo.model_validate(init_dict)

    def parse_update_info(self, update_dict: dict[str, Any]) -> Action:
        """One action (`transfer_wire`), validated."""
        return ACTIONS.validate_python(update_dict)

    def init_transfer_engine(self, init_info: JoinInfo) -> None:
        """Join the trainer's group (blocks until every rank is in or its timeout passes)."""
        self.shutdown()
        self._reference()  # no group to join when updates are impossible anyway
        init = init_info.init
        self._store, self._group = join_group(init, host=init_info.host, device=self.device)
        self._init = init
        logger.info(
            "joined weight broadcast group %r as rank %d of %d (%s)",
            init.group_name,
            init.rank,
            init.world_size,
            init.backend,
        )

    def start_weight_update(self) -> None:
        """Nothing to prepare: the model changes only in a `load` action."""

    def finish_weight_update(self) -> None:
        """Nothing to finalize: a `load` action completes vLLM's reload itself."""

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Run one action. Overridden because the base class synchronizes an accelerator
        unconditionally, which raises on a CPU-only host."""
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.current_accelerator() is not None:
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: Action) -> None:
        """Dispatch one action (see the module doc)."""
        if isinstance(update_info, Receive):
            self._receive(update_info.request)
        elif isinstance(update_info, Load):
            self._load()
        elif isinstance(update_info, Restore):
            if self._kept is None:
                raise RuntimeError("no broadcast weights are kept here to restore")
            self._reload(self._kept)
            logger.info("restored the weights of the last broadcast")
        elif isinstance(update_info, Discard):
            self._staged = None
        else:
            self._kept = None

    def shutdown(self) -> None:
        """Drop the group (staged and kept weights stay: a commit may still follow)."""
        if self._group is not None and self._init is not None:
            logger.info("left weight broadcast group %r", self._init.group_name)
        self._group = self._store = None
        self._init = None

    # ----------------------------------------------------------------- actions

    def _reference(self) -> CheckpointSpec:
        if self._spec is None:
            reference = reference_checkpoint(self._initial_model)
            if reference.spec is None:
                raise ValueError(f"{REFUSED}weight updates are unavailable: {reference.error}")
            self._spec = reference.spec
        return self._spec

    def _receive(self, request: BroadcastRequest) -> None:
        self._staged = None  # superseded: free it before allocating the next staging
        self._check_manifest(request)
        init, group = self._init, self._group
        if init is None or group is None:
            raise RuntimeError("group_name: no broadcast group is joined in vLLM's worker")
        if init.group_name != request.group_name:
            raise RuntimeError(
                f"group_name: {request.group_name!r} is not the joined group {init.group_name!r}"
            )
        try:
            staging = receive_buckets(
                group,
                request.tensors,
                request.bucket_plan(),
                backend=init.backend,
                device=self.device,
            )
        except BaseException:
            self.shutdown()  # the group is broken: drop it, its connections close
            raise
        tensors = {t.name: staging[i] for i, t in enumerate(request.tensors)}
        self._check_tied(tensors)
        self._staged = tensors
        logger.info(
            "received version %d of the weights (%d tensors)", request.version, len(tensors)
        )

    def _check_manifest(self, request: BroadcastRequest) -> None:
        names = [t.name for t in request.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"{REFUSED}the manifest names a tensor twice")
        try:
            check_layout(
                {t.name: (tuple(t.shape), t.dtype) for t in request.tensors}, self._reference()
            )
        except WeightsError as exc:
            raise ValueError(f"{REFUSED}{exc}") from exc

    def _check_tied(self, tensors: dict[str, torch.Tensor]) -> None:
        """With tied embeddings vLLM loads one of the two; both given must be equal."""
        config = self.model_config.hf_text_config
        if not getattr(config, "tie_word_embeddings", False):
            return
        head = tensors.get("lm_head.weight")
        embed = next((n for n in tensors if n.endswith("embed_tokens.weight")), None)
        if head is not None and embed is not None and not torch.equal(head, tensors[embed]):
            raise ValueError(f"{REFUSED}tied tensors {embed!r} and 'lm_head.weight' differ")

    def _load(self) -> None:
        tensors, self._staged = self._staged, None
        if tensors is None:
            raise RuntimeError("no received weights to load (receive a broadcast first)")
        self._reload(tensors)
        self._kept = tensors

    def _reload(self, tensors: dict[str, torch.Tensor]) -> None:
        """vLLM's in-place reload from `tensors` (checkpoint names, CPU)."""
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        reload_weights(
            self.vllm_config,
            self.model,
            weights_iterator=iter(tensors.items()),
            weights_path=None,
            is_checkpoint_format=True,
        )
