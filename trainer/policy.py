"""The trainable student: loading, logprobs of sampled tokens in chunks, micro-batched steps.

Memory is the point of this module. The naive ``log_softmax(model(ids).logits / T)`` holds
float32 logits of shape ``[batch, length, vocab]`` -- for 768 sequences of 1.3k tokens and
Qwen's 152k vocabulary that is over 600 GB. Instead:

1. the model *body* (embeddings, decoder layers, final norm) runs on a micro-batch of
   length-bucketed sequences (:func:`plan_micro_batches`);
2. only the hidden states of positions that predict a response token are kept;
3. :func:`chunked_token_logprobs` projects them to the vocabulary and keeps just
   ``log_softmax(logits / T)[sampled token]`` plus one logsumexp per token: on CUDA in the
   fused Triton kernel (logits live only in on-chip tiles), elsewhere ``chunk`` tokens at a
   time in torch; both backwards recompute the logits, so at most ``[chunk, vocab]`` float32
   logits exist at any moment (``trainer.kernels.linear_logprob``).

The temperature is the rollout's (``logits / T``), so before the first update the trainer's
``log pi_theta`` of a sampled token equals the rollout's recorded logprob and the PPO ratio is 1.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from services.engine.dtypes import torch_dtype
from trainer.algorithms import LossConfig, LossSums
from trainer.config import StudentConfig
from trainer.kernels import linear_logprob, opd_loss
from trainer.topk_loss import TopKSums, topk_loss

__all__ = [
    "MicroBatch",
    "PolicyModel",
    "TrainSequence",
    "chunked_token_logprobs",
    "collate",
    "export_state_dict",
    "forward_backward",
    "load_student",
    "plan_micro_batches",
    "resolve_device",
    "torch_dtype",
]

log = logging.getLogger("opd.trainer.policy")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if spec == "auto":
        return (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
    if spec == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(spec)


# --------------------------------------------------------------------------------- logprobs


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    chunk_tokens: int = 1024,
    backend: str = "auto",
) -> Tensor:
    """``[N]`` logprob (float32; float64 for float64 weights) of ``targets[i]`` under ``softmax((hidden[i] @ W.T + b) / T)``.

    ``hidden`` is ``[N, H]``, ``weight`` the output projection ``[V, H]``. Differentiable with
    respect to ``hidden``, ``weight`` and ``bias``; no ``[N, V]`` tensor is kept. On CUDA the
    fused Triton kernel runs (``trainer.kernels.linear_logprob``), elsewhere the chunked torch
    path, ``chunk_tokens`` rows at a time. Under ``torch.autocast`` the projection runs in the
    autocast dtype.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden [N, H] and targets [N] expected, got {hidden.shape}, {targets.shape}"
        )
    return linear_logprob(
        hidden,
        weight,
        targets,
        temperature,
        bias=bias,
        backend=backend,  # type: ignore[arg-type]
        chunk_tokens=chunk_tokens,
    ).logp


class PolicyModel(nn.Module):
    """A causal LM whose forward returns logprobs of given tokens, never full logits.

    Wrapping the transformers model (rather than calling its parts from outside) keeps every
    parameter use inside one ``forward``, which is what FSDP2's unshard/reshard hooks need.
    """

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens
        config = getattr(causal_lm, "config", None)
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(config, attr, None) not in (None, 1.0):
                raise NotImplementedError(
                    f"{type(causal_lm).__name__} post-processes its logits ({attr}); the chunked "
                    "logprob head computes plain logits / T"
                )

    @property
    def body(self) -> nn.Module:
        """The decoder stack without the vocabulary projection."""
        return getattr(self.causal_lm, self.causal_lm.base_model_prefix)

    def forward(
        self,
        input_ids: Tensor,
        gather_index: Tensor,
        targets: Tensor,
        temperature: float,
        k_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logprobs ``[N]`` of ``targets`` predicted at flat positions ``gather_index`` and,
        with ``k_ids [N, K]`` (the teacher's top-k), the logprobs ``[N, K]`` at those ids
        from the same LM-head pass.

        ``input_ids`` is right-padded ``[B, L]``; no attention mask is needed because causal
        attention never lets a real token see the padding after it.
        """
        hidden = self.body(input_ids=input_ids, use_cache=False).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather_index)
        head = self.causal_lm.get_output_embeddings()
        if selected.shape[0] != targets.shape[0]:
            raise ValueError(f"{selected.shape[0]} positions for {targets.shape[0]} targets")
        out = linear_logprob(
            selected,
            head.weight,
            targets,
            temperature,
            bias=getattr(head, "bias", None),
            k_ids=k_ids,
            chunk_tokens=self.chunk_tokens,
        )
        return out.logp, out.k_logp


# --------------------------------------------------------------------------------- loading


def load_student(cfg: StudentConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """Load the student (transformers ``AutoModelForCausalLM``) and its tokenizer.

    Dropout is switched off everywhere: the PPO ratio must be exactly 1 for unchanged
    weights, which a random dropout mask would break. Train mode stays on so gradient
    checkpointing (which transformers applies only in training) works.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model,
        dtype=torch_dtype(cfg.dtype),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code
    )
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model.to(device), tokenizer


def output_embedding_key(causal_lm: nn.Module) -> str | None:
    """State-dict name of the output projection's weight (``lm_head.weight``)."""
    head = causal_lm.get_output_embeddings()
    for name, module in causal_lm.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def export_state_dict(
    state: dict[str, Tensor], causal_lm: nn.Module, dtype: torch.dtype
) -> dict[str, Tensor]:
    """A full state dict as it goes into safetensors: CPU, ``dtype``, contiguous, and without
    the output projection when it is tied to the input embeddings (transformers' layout)."""
    tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
    head_key = output_embedding_key(causal_lm) if tied else None
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("causal_lm.")
        if name == head_key:
            continue
        out[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


# --------------------------------------------------------------------------------- batches


@dataclass
class TrainSequence:
    """One sampled response with everything the loss needs (numpy, host memory)."""

    prompt_ids: np.ndarray  # int64 [P]
    response_ids: np.ndarray  # int64 [R]
    behaviour_logprobs: np.ndarray  # float32 [R]  (s: the rollout's logprobs, after temperature)
    teacher_logprobs: np.ndarray  # float32 [R]  (tau)
    trainable: bool = True  # False: kept for metrics only (empty, or masked when truncated)
    # False: in the teacher's top-k term only, not the sampled-token term (a truncated
    # response under rollout.mask_truncated: sampled_token)
    policy_loss: bool = True
    teacher_top_ids: np.ndarray | None = None  # int64 [R, K]  (algorithm.teacher_top_k)
    teacher_top_logprobs: np.ndarray | None = None  # float32 [R, K]

    @property
    def length(self) -> int:
        """Tokens the student forward must see (prompt + response)."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Tensors of one forward/backward: right-padded ids and ``[B, T]`` response tensors."""

    input_ids: Tensor  # [B, L]
    gather_index: Tensor  # [N] flat positions in [B*L] whose next token is a response token
    targets: Tensor  # [N] those response tokens
    scatter_index: Tensor  # [N] flat positions in [B*T] of the same tokens
    s: Tensor  # [B, T]
    tau: Tensor  # [B, T]
    mask: Tensor  # [B, T] bool: the tokens of the loss (the top-k term's)
    policy_mask: Tensor  # [B, T] bool: those of the sampled-token term (a subset of mask's)
    k_ids: Tensor | None = None  # [N, K] the teacher's top-k ids at the same tokens
    teacher_k: Tensor | None = None  # [N, K] the teacher's logprobs at k_ids

    @property
    def padded_tokens(self) -> int:
        """``B * L``: what the token budget counts."""
        return int(self.input_ids.numel())


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``token_budget`` padded tokens.

    Sorting by length first (longest first) puts similar lengths together, so little of the
    budget is spent on padding. A single sequence longer than the budget gets its own batch.
    """
    # Mirrors services.engine.hf.scoring.pack_batches on purpose: the trainer imports only the
    # wire contract and the launcher from services/, and packs longest first, by index.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(seqs: Sequence[TrainSequence], device: torch.device) -> MicroBatch:
    """Right-pad sequences into one :class:`MicroBatch` on ``device``."""
    if not seqs:
        return empty_micro_batch(device)
    b = len(seqs)
    seq_len = max(s.length for s in seqs)
    resp_len = max(max(len(s.response_ids) for s in seqs), 1)
    input_ids = np.zeros((b, seq_len), dtype=np.int64)
    s_arr = np.zeros((b, resp_len), dtype=np.float32)
    tau_arr = np.zeros((b, resp_len), dtype=np.float32)
    mask = np.zeros((b, resp_len), dtype=bool)
    pg_rows = np.ones(b, dtype=bool)
    gather, scatter, targets = [], [], []
    top_ids: list[np.ndarray] = []
    top_lps: list[np.ndarray] = []
    k = _top_k(seqs)
    for row, seq in enumerate(seqs):
        p, r = len(seq.prompt_ids), len(seq.response_ids)
        input_ids[row, :p] = seq.prompt_ids
        input_ids[row, p : p + r] = seq.response_ids
        if not seq.trainable or r == 0:
            continue
        # The hidden state at position p-1+i predicts response token i.
        gather.append(row * seq_len + p - 1 + np.arange(r))
        scatter.append(row * resp_len + np.arange(r))
        targets.append(seq.response_ids)
        s_arr[row, :r] = seq.behaviour_logprobs
        tau_arr[row, :r] = seq.teacher_logprobs
        mask[row, :r] = True
        pg_rows[row] = seq.policy_loss
        if k:
            top_ids.append(seq.teacher_top_ids)  # type: ignore[arg-type]
            top_lps.append(seq.teacher_top_logprobs)  # type: ignore[arg-type]

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def t(x: np.ndarray) -> Tensor:
        return torch.from_numpy(x).to(device)

    return MicroBatch(
        input_ids=t(input_ids),
        gather_index=t(cat(gather).astype(np.int64)),
        targets=t(cat(targets).astype(np.int64)),
        scatter_index=t(cat(scatter).astype(np.int64)),
        s=t(s_arr),
        tau=t(tau_arr),
        mask=t(mask),
        policy_mask=t(mask & pg_rows[:, None]),
        k_ids=t(_stack(top_ids, k, np.int64)) if k else None,
        teacher_k=t(_stack(top_lps, k, np.float32)) if k else None,
    )


def _top_k(seqs: Sequence[TrainSequence]) -> int:
    """K of the teacher's top-k the sequences carry (0: none); all trainable ones agree."""
    ks = {
        0 if s.teacher_top_ids is None else int(s.teacher_top_ids.shape[1])
        for s in seqs
        if s.trainable and len(s.response_ids)
    }
    if len(ks) > 1:
        raise ValueError(f"sequences carry different numbers of teacher top-k ids: {sorted(ks)}")
    return ks.pop() if ks else 0


def _stack(parts: list[np.ndarray], k: int, dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, k), dtype=dtype)


def empty_micro_batch(device: torch.device) -> MicroBatch:
    """A do-nothing micro-batch (all masked). Under FSDP every rank must run the same
    number of forwards; ranks with fewer real micro-batches run these."""
    z = torch.zeros(0, dtype=torch.long, device=device)
    none = torch.zeros((1, 1), dtype=torch.bool, device=device)
    return MicroBatch(
        input_ids=torch.zeros((1, 2), dtype=torch.long, device=device),
        gather_index=z,
        targets=z,
        scatter_index=z,
        s=torch.zeros((1, 1), device=device),
        tau=torch.zeros((1, 1), device=device),
        mask=none,
        policy_mask=none,
    )


def micro_batch_logprobs(
    policy: nn.Module, mb: MicroBatch, temperature: float
) -> tuple[Tensor, Tensor | None]:
    """``[B, T]`` float32 ``log pi_theta`` of the response tokens (0 where masked), and the
    student's ``[N, K]`` logprobs at the teacher's top-k ids (None without them)."""
    flat, k_logp = policy(mb.input_ids, mb.gather_index, mb.targets, temperature, mb.k_ids)
    b, t = mb.mask.shape
    # Out-of-place index_copy keeps the graph: gradient flows only into the real tokens.
    return flat.new_zeros(b * t).index_copy(0, mb.scatter_index, flat).view(b, t), k_logp


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_backward(
    policy: nn.Module,
    micro_batches: Sequence[MicroBatch],
    cfg: LossConfig,
    *,
    temperature: float,
    total_tokens: float,
    total_seqs: float,
    loss_scale: float = 1.0,
    backend: str = "auto",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[LossSums, TopKSums] | None:
    """Accumulate the gradient of the whole batch's loss over its micro-batches.

    Each micro-batch's loss is its share of the full-batch aggregate (``total_tokens`` /
    ``total_seqs`` are the whole batch's), so the accumulated gradient equals the full-batch
    gradient. ``loss_scale`` undoes FSDP's averaging over ranks. With the teacher's top-k in
    the batch (``algorithm.teacher_top_k``) the top-k divergence term joins the loss
    (:mod:`trainer.topk_loss`); the sampled-token term then covers ``MicroBatch.policy_mask``,
    averaged over the same totals (a token outside it adds nothing to that term but still
    counts). Returns the summed metric sums (None when there were no micro-batches).
    """
    parts: list[LossSums] = []
    topk_parts: list[TopKSums] = []
    for mb in micro_batches:
        device = mb.input_ids.device
        with _autocast(device, autocast_dtype):
            logp, k_logp = micro_batch_logprobs(policy, mb, temperature)
        loss, sums = opd_loss(
            logp,
            mb.s,
            mb.tau,
            mb.policy_mask,
            cfg,
            total_tokens=total_tokens,
            total_seqs=total_seqs,
            backend=backend,  # type: ignore[arg-type]
        )
        if k_logp is not None and mb.teacher_k is not None:
            topk, topk_sums = topk_loss(
                k_logp,
                mb.teacher_k,
                mb.scatter_index,
                mb.mask,
                cfg,
                total_tokens=total_tokens,
                total_seqs=total_seqs,
                backend=backend,
            )
            loss = loss + topk
            topk_parts.append(topk_sums)
        else:
            topk_parts.append(TopKSums.zeros(device))
        (loss * loss_scale).backward()
        parts.append(sums)
    if not parts:
        return None
    return sum(parts), sum(topk_parts)  # type: ignore[return-value]


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
