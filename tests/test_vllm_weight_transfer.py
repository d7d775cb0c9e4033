"""The broadcast transport's engine in vLLM's worker (`services/engine/vllm/weight_transfer.py`),
in this process, without starting vLLM: it joins a real gloo group with this test as the
trainer (rank 0), refuses a misfit manifest before receiving and tied embeddings that differ
after receiving, and stages exactly what was sent; the service side (`transfer.failure`) turns
its refusals, wrapped the way vLLM hands errors across processes, into `WeightsError`. The
whole path through a running vLLM replica is tested in tests/test_broadcast_sync_vllm.py.
"""

from __future__ import annotations

import gc
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed import TCPStore

from services.engine.base import WeightsError
from services.protocol import BroadcastInitRequest, BroadcastRequest
from services.student_rollout.broadcast_group import open_group, pack, prefixed_store
from tests.backends import needs_vllm
from tests.rollout_reference import perturbed

pytestmark = [pytest.mark.vllm, needs_vllm]


def test_vllm_worker_side_checks_what_it_receives(tiny_models):
    """See the module doc (the model is never loaded into: `load` needs a running vLLM)."""
    from services.engine.vllm.transfer import failure
    from services.engine.vllm.transfer_wire import JoinInfo
    from services.engine.vllm.weight_transfer import BroadcastWeightTransferEngine

    model_config = SimpleNamespace(
        model=str(tiny_models["student"]), hf_text_config=SimpleNamespace(tie_word_embeddings=True)
    )
    vllm_config = SimpleNamespace(parallel_config=None, model_config=model_config)
    cpu = torch.device("cpu")
    worker = BroadcastWeightTransferEngine(None, vllm_config, cpu, torch.nn.Module())  # type: ignore[arg-type]
    store = TCPStore(
        "127.0.0.1",
        0,
        world_size=None,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
    )
    init = BroadcastInitRequest(
        master_addr="127.0.0.1",
        master_port=store.port,
        rank=1,
        world_size=2,
        group_name="unit",
        timeout_s=30.0,
    )
    joining = threading.Thread(
        target=worker.init_transfer_engine, args=(JoinInfo(init=init, host="127.0.0.1"),)
    )
    joining.start()
    group = open_group(
        "gloo", prefixed_store(store, "unit"), 0, 2, 30.0, host="127.0.0.1", device=cpu
    )
    joining.join()

    initial = load_file(str(tiny_models["student"] / "model.safetensors"))
    names = list(initial)

    def request(state: dict[str, torch.Tensor]) -> BroadcastRequest:
        manifest = [
            {"name": n, "shape": list(t.shape), "dtype": "float32"} for n, t in state.items()
        ]
        return BroadcastRequest(
            version=1, group_name="unit", tensors=manifest, bucket_bytes=256 * 1024
        )

    def broadcast(state: dict[str, torch.Tensor]) -> BaseException | None:
        """The worker receives on a thread while this side sends; what the worker raised."""
        req, raised = request(state), []

        def receive() -> None:
            try:
                worker.update_weights({"action": "receive", "request": req.model_dump()})
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                raised.append(exc)

        receiving = threading.Thread(target=receive)
        receiving.start()
        plan, tensors = req.bucket_plan(), list(state.values())
        for bucket in plan:
            flat = torch.empty(bucket.nbytes, dtype=torch.uint8)
            pack(bucket, tensors, flat)
            group.broadcast(flat, root=0).wait()
        receiving.join()
        return raised[0] if raised else None

    try:
        misfit = dict(initial)
        misfit[names[1]] = torch.zeros(3, 3)
        with pytest.raises(ValueError) as caught:  # before a byte is received
            worker.update_weights({"action": "receive", "request": request(misfit).model_dump()})
        wrapped = Exception(
            f"Call to collective_rpc method failed: Worker failed with error "
            f"'{caught.value}', please check the stack trace above for the root "
            "cause"
        )
        refused = failure(wrapped)
        assert isinstance(refused, WeightsError) and names[1] in str(refused), refused
        assert "(3, 3)" in str(refused) and not str(refused).startswith("opd-refused")

        untied = perturbed(initial, seed=30)
        untied["lm_head.weight"] = untied["model.embed_tokens.weight"] + 1.0
        exc = broadcast(untied)
        assert isinstance(failure(exc or Exception()), WeightsError), exc
        assert "tied tensors" in str(exc), exc

        tied = perturbed(initial, seed=31)
        tied["lm_head.weight"] = tied["model.embed_tokens.weight"].clone()
        assert broadcast(tied) is None
        staged = worker._staged
        assert staged is not None and list(staged) == names
        for name in names:
            assert torch.equal(staged[name], tied[name]), name
        worker.update_weights({"action": "discard"})
        assert worker._staged is None
        worker.shutdown()  # the group is left: a receive fails at once, naming the field
        with pytest.raises(RuntimeError, match="group_name: no broadcast group"):
            worker.update_weights({"action": "receive", "request": request(tied).model_dump()})
    finally:
        worker.shutdown()
        group = None
        gc.collect()
