"""The payloads of vLLM's weight-transfer calls for the broadcast transport (both processes).

`AsyncLLM.init_weight_transfer_engine` and `AsyncLLM.update_weights` carry plain dicts from
the rollout service to vLLM's worker process. These models are what those dicts hold: the
service dumps them (`services.engine.vllm.broadcast`), the worker's engine validates them
(`services.engine.vllm.weight_transfer`). The broadcast itself is the rollout service's wire
contract (`BroadcastInitRequest`, `BroadcastRequest`), already checked by the service and
checked again in the worker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from services.protocol import BroadcastInitRequest, BroadcastRequest

#: `WeightTransferConfig.backend`: the name the engine is registered under in vLLM's
#: `WeightTransferEngineFactory` (`services.engine.vllm.plugin`).
BACKEND = "opd_broadcast"
#: Starts the message of a worker error that means "these weights do not fit the model"
#: (`WeightsError` in the service); vLLM passes only the message across processes.
REFUSED = "opd-refused: "


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JoinInfo(_Payload):
    """`init_weight_transfer_engine`'s `init_info`: the group to join, and where gloo binds."""

    init: BroadcastInitRequest
    host: str = Field(min_length=1, description="this host's address on the route to the trainer")


class Receive(_Payload):
    """Receive every bucket of `request` into staging and check it; the model is untouched."""

    action: Literal["receive"] = "receive"
    request: BroadcastRequest


class Load(_Payload):
    """Load the staged weights into the model; they become the kept weights."""

    action: Literal["load"] = "load"


class Restore(_Payload):
    """Load the kept weights (the last broadcast that served) back into the model."""

    action: Literal["restore"] = "restore"


class Discard(_Payload):
    """Drop the staged weights (a cancelled or refused broadcast)."""

    action: Literal["discard"] = "discard"


class Forget(_Payload):
    """Drop the kept weights (weights from disk serve now, and restore from there)."""

    action: Literal["forget"] = "forget"


Action = Annotated[Receive | Load | Restore | Discard | Forget, Field(discriminator="action")]
#: `update_weights`' `update_info`: one action per call.
ACTIONS: TypeAdapter[Receive | Load | Restore | Discard | Forget] = TypeAdapter(Action)
