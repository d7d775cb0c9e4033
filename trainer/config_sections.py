"""The sections of the trainer's configuration (``trainer.config.TrainConfig``'s parts).

Pure pydantic: no torch here, so loading and checking a config is cheap and the services'
images need nothing of the trainer's stack. :class:`LossConfig` is the ``algorithm`` section;
the loss code (:mod:`trainer.algorithms`) re-exports it.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Aggregation",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "RolloutConfig",
    "Section",
    "ServicesConfig",
    "StudentConfig",
    "SyncConfig",
    "TeacherConfig",
    "TeacherContextConfig",
    "TrainerConfig",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------- sections


class StudentConfig(Section):
    """The trainable student model (loaded by the trainer with transformers)."""

    model: str = Field(description="hub id or local path of the student checkpoint")
    tokenizer: str | None = Field(None, description="tokenizer path or id; default: `model`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the trained (master) parameters and the optimizer state. Keep "
        "float32: at lr 1e-5 most bf16 updates would round away",
    )
    autocast_dtype: Literal["bfloat16", "float16"] | None = Field(
        None,
        description="run the forward/backward under torch.autocast in this dtype (GPU, or a "
        "CPU with native bf16: `opd demo` sets bfloat16 there); the log-softmax of the "
        "vocabulary projection stays float32",
    )
    device: str = Field(
        "auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1'"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute decoder-layer activations in the backward (saves memory)"
    )
    logprob_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="response tokens projected to the vocabulary at once when computing the "
        "logprobs of the sampled tokens; full [tokens, vocab] float32 logits never exist",
    )
    attn_implementation: str | None = Field(
        "sdpa", description="transformers attention implementation ('sdpa', 'eager', ...)"
    )
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub")


class TeacherContextConfig(Section):
    """What the teacher sees in place of the student's prompt; both score exactly the student's
    completion tokens (context distillation; privileged-information distillation)."""

    system: str | None = Field(
        None,
        description="system prompt for the teacher only (replaces the student's); null: the "
        "student's system prompt",
    )
    few_shot: int = Field(
        0,
        ge=0,
        description="K solved problems as prior chat turns: the first K of the train split "
        "(never sampled as training prompts), their reference solutions rewritten to end in "
        "the prompt's answer format, a final \\boxed{}",
    )
    reference_solution: bool = Field(
        False,
        description="put the problem's own reference solution (rewritten the same way) in the "
        "teacher's user turn: the teacher judges the student's reasoning knowing the answer",
    )

    @property
    def active(self) -> bool:
        """Whether the teacher's prompt differs from the student's."""
        return bool(self.system) or self.few_shot > 0 or self.reference_solution


class TeacherConfig(Section):
    """How the teacher service scores the student's tokens."""

    context: TeacherContextConfig = Field(
        default_factory=TeacherContextConfig,
        description="the teacher's own prompt (system prompt, few-shot turns, reference "
        "solution); by default the teacher sees the student's prompt",
    )

    model: str | None = Field(
        None,
        description="the model the teacher service must serve, checked against its /info "
        "(model or served name; a local path matches a hub id by its last component); "
        "null: not checked",
    )
    temperature: float | None = Field(
        None, gt=0.0, description="scoring temperature (logits / T); null: `rollout.temperature`"
    )
    sequences_per_request: int = Field(
        64, ge=1, description="sequences per POST /v1/score (requests run concurrently)"
    )


class RolloutConfig(Section):
    """What the student samples each step (through the rollout service)."""

    prompts_per_step: int = Field(96, ge=1, description="GSM8K prompts drawn per step")
    samples_per_prompt: int = Field(8, ge=1, description="samples (n) per prompt")
    max_tokens: int = Field(1024, ge=1, description="response tokens at most per sample")
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="sampling temperature; the trainer computes its logprobs as "
        "log_softmax(logits / T) so the PPO ratio is 1 before the first update. No top-p/top-k: "
        "the trainer's logprobs are those of the full tempered distribution",
    )
    prompts_per_request: int = Field(
        8,
        ge=1,
        description="prompts per POST /v1/rollouts (requests run concurrently; each gets a "
        "seed derived from (seed, step, index of its first prompt))",
    )
    mask_truncated: bool | Literal["sampled_token"] = Field(
        False,
        description="responses cut at max_tokens (finish_reason 'length'): true drops them from "
        "the loss; 'sampled_token' drops them from the sampled-token term only and keeps them "
        "in the teacher's top-k term (`algorithm.teacher_top_k`); false keeps them. Off by "
        "default: a truncated response's per-token reverse KL is still exact",
    )


class TrainerConfig(Section):
    """Optimisation: AdamW, schedule, clipping, micro-batching, length of the run."""

    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate (peak, after warm-up)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule after warm-up (decays to 0 at the end)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from 0 to `lr`")
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="clip the global gradient norm to this; null: no clipping"
    )
    max_model_len: int = Field(
        2048, ge=2, description="longest prompt + response; longer prompts are dropped at load"
    )
    micro_batch_tokens: int = Field(
        16384,
        ge=2,
        description="padded tokens (sequences x longest length) per forward/backward; "
        "sequences are bucketed by length. Must hold one max_model_len sequence",
    )
    epochs: int = Field(1, ge=1, description="passes over the training prompts")
    total_steps: int | None = Field(
        None, ge=1, description="stop after this many steps; null: when `epochs` are done"
    )
    loss_backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="opd_loss backend: auto = Triton on CUDA, torch elsewhere"
    )


class SyncConfig(Section):
    """How new student weights reach the rollout service, and how stale a batch may be."""

    method: Literal["auto", "load", "upload", "broadcast"] = Field(
        "auto",
        description="'load': write safetensors into `shared_dir` and POST /v1/weights/load "
        "(both sides see the same disk); 'upload': PUT /v1/weights with the file as body; "
        "'auto': load when `shared_dir` is set and the service accepts it, else upload; "
        "'broadcast': send the weights over a torch.distributed group the trainer and every "
        "rollout replica join (NCCL between GPU hosts, gloo on CPU), no file written; a "
        "failed broadcast falls back to the disk path",
    )
    shared_dir: str | None = Field(
        None,
        description="trainer-side directory inside the rollout service's --weights-dir "
        "(needed for 'load')",
    )
    service_dir: str | None = Field(
        None,
        description="the same directory as the rollout service sees it (containers); "
        "default: `shared_dir`",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of pushed weights; 'auto': the dtype the student checkpoint was "
        "saved in (what the rollout service validates updates against)",
    )
    broadcast_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="'broadcast' only: the group's backend; 'auto': nccl when the trainer has "
        "CUDA, else gloo (a replica whose model is not on a CUDA device needs gloo)",
    )
    broadcast_addr: str | None = Field(
        None,
        description="'broadcast' only: this trainer's address as the rollout replicas reach "
        "it (its TCPStore and gloo bind there); null: the local address on the route to the "
        "first rollout replica",
    )
    broadcast_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="'broadcast' only: port of the trainer's TCPStore (open it between the "
        "hosts); null: a free port. Not torchrun's MASTER_PORT",
    )
    bucket_mb: float = Field(
        512.0,
        gt=0.0,
        description="'broadcast' only: megabytes per bucket at most (one collective each; a "
        "larger tensor goes in a bucket of its own). Each side holds one bucket buffer",
    )
    broadcast_timeout_s: float = Field(
        300.0,
        gt=0.0,
        le=3600.0,
        description="'broadcast' only: joining the group, each bucket and each replica's swap "
        "fail after this long (then the disk path is used)",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="0: strictly on-policy (generate, then train). K >= 1: up to K batches are "
        "generated ahead while the current one trains (policy/staleness <= K)",
    )


class DataConfig(Section):
    """Where the GSM8K prompts come from."""

    source: str | None = Field(
        None,
        description="directory with train.jsonl/test.jsonl, a .jsonl/.parquet file, a hub "
        "id, or 'bundled' (the GSM8K subset shipped with the package: 1,000 train and 200 "
        "test problems); null: $OPD_DATA_DIR, then the hub's openai/gsm8k",
    )
    train_limit: int | None = Field(
        None, ge=1, description="use only the first N training problems"
    )
    shuffle: bool = Field(True, description="reshuffle the prompts every epoch (seeded)")


class EvalConfig(Section):
    """Greedy GSM8K test accuracy through the rollout service."""

    interval: int = Field(
        0, ge=0, description="evaluate every N steps (0: only at start/end as set below)"
    )
    at_start: bool = Field(True, description="evaluate the initial weights (logged at step 0)")
    at_end: bool = Field(True, description="evaluate after the last step")
    limit: int | None = Field(None, ge=1, description="first N test problems; null: all 1319")
    interval_limit: int | None = Field(
        None,
        ge=1,
        description="first N of those problems for the evaluations between the start and the "
        "end (every `interval` steps), to make them cheaper; null: `limit`",
    )
    max_tokens: int = Field(1024, ge=1, description="response tokens at most (greedy)")
    prompts_per_request: int = Field(32, ge=1, description="prompts per POST /v1/rollouts")
    kl_prompts: int = Field(
        0,
        ge=0,
        description="also measure eval/reverse_kl: sample on the first N test prompts at "
        "`rollout.temperature`, score with the teacher, sum (s - tau) per token and per answer "
        "(eval/reverse_kl_per_answer). 0: off",
    )
    kl_samples_per_prompt: int = Field(
        4, ge=1, description="samples per prompt for eval/reverse_kl"
    )


class CheckpointConfig(Section):
    """Atomic, resumable checkpoints under RUN_DIR/checkpoints/step-NNNNNN."""

    interval: int = Field(
        50, ge=0, description="save every N steps (0: only at the end, when `at_end`)"
    )
    at_end: bool = Field(True, description="save after the last step")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    save_optimizer: bool = Field(
        True, description="include the optimizer state (needed for an exact resume)"
    )


class LoggingConfig(Section):
    """Metrics sinks: RUN_DIR/metrics.jsonl always; TensorBoard, Prometheus, progress bar."""

    metrics_port: int = Field(
        8003, ge=0, le=65535, description="Prometheus /metrics port of the trainer; 0: off"
    )
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    tensorboard: bool = Field(
        True, description="also write TensorBoard events to RUN_DIR/tensorboard (if installed)"
    )
    progress_bar: bool = Field(True, description="live tqdm progress bar with the key numbers")
    samples_per_step: int = Field(
        2, ge=0, description="responses per step written to RUN_DIR/samples.jsonl"
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")


class ServicesConfig(Section):
    """Where the teacher and rollout services are, and how to talk to them."""

    teacher_url: str | None = Field(
        None,
        description="teacher service base URL (one replica, or a router in front of a pool); "
        "null: http://localhost:8001, unless `teacher_urls` is set",
    )
    rollout_url: str | None = Field(
        None,
        description="rollout service base URL (one replica); null: http://localhost:8002, "
        "unless `rollout_urls` is set",
    )
    teacher_urls: list[str] | None = Field(
        None,
        description="several teacher replicas, in place of `teacher_url`: the trainer sends "
        "each scoring request to the replica with the fewest requests in flight, sets aside a "
        "replica that fails (and takes it back once its /ready answers 200) and retries the "
        "request on another. Give either this or `teacher_url`, not both",
    )
    rollout_urls: list[str] | None = Field(
        None,
        description="several rollout replicas, in place of `rollout_url`: rollout requests are "
        "balanced like the teacher's; every weight update goes to each replica directly, and "
        "a replica that restarted or comes back gets the current weights before it samples "
        "again. Give either this or `rollout_url`, not both",
    )
    api_key_env: str = Field(
        "OPD_API_KEY",
        description="environment variable holding the services' API key (sent as Bearer); "
        "unset or empty: no key. The key itself never goes into a config file",
    )
    # Field runs shaped like TrainerConfig's only: each section declares its own knobs.
    request_timeout_s: float = Field(
        900.0, gt=0.0, description="timeout of one HTTP request (a whole rollout batch)"
    )
    ready_timeout_s: float = Field(
        900.0, gt=0.0, description="how long to wait at start for both services' /ready"
    )
    retry_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="give up on a failing request after retrying this long (covers a service "
        "restart)",
    )
    max_attempts: int = Field(30, ge=1, description="attempts per request at most")
    backoff_initial_s: float = Field(0.5, gt=0.0, description="first retry delay")
    backoff_max_s: float = Field(30.0, gt=0.0, description="longest retry delay")
    max_concurrency: int = Field(
        8,
        ge=1,
        description="HTTP requests in flight per service (over all of its replicas: raise it "
        "with the number of replicas)",
    )

    def pool_urls(self, pool: Literal["teacher", "rollout"]) -> list[str]:
        """The base URLs of the ``teacher`` or ``rollout`` replicas (the list, else the single
        URL, else the local default)."""
        many = self.teacher_urls if pool == "teacher" else self.rollout_urls
        one = self.teacher_url if pool == "teacher" else self.rollout_url
        default = "http://localhost:8001" if pool == "teacher" else "http://localhost:8002"
        return list(many) if many is not None else [one or default]


class LossConfig(pydantic.BaseModel):
    """Scalars of the OPD loss (docs/design.md §4). Immutable."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    #: advantage: reverse KL ``c (tau - s)`` or generalized JSD ``-c j_t``, for ``0 < b < 1``
    #: with ``j_t = s - log M`` (the exact policy gradient, not Trinity-RFT's single-sample
    #: cost; see docs/trainer.md)
    algorithm: Literal["on_policy_distill", "jsd"] = "on_policy_distill"
    #: ``c``: scale of the advantage.
    kl_coef: float = pydantic.Field(1.0, allow_inf_nan=False)
    #: ``b``: teacher weight of the JSD mixture ``M = b*teacher + (1-b)*student``.
    lambda_coef: float = pydantic.Field(0.5, ge=0.0, le=1.0)
    loss: Literal["ppo", "importance_sampling"] = "ppo"
    #: ``e``: PPO clip range, ratio clipped to ``[1-e, 1+e]``.
    clip_eps: float = pydantic.Field(0.2, gt=0.0, lt=1.0)
    #: ``C``: dual-clip bound for negative advantages; must exceed ``1 + clip_eps`` to matter.
    dual_clip: float = pydantic.Field(3.0, gt=1.0, allow_inf_nan=False)
    aggregation: Aggregation = "token-mean"
    #: run ``algorithm: jsd`` with ``lambda_coef: 1`` anyway. Its cost is ``j_t = tau - s``, so
    #: the advantage ``c (s - tau)`` rewards moving *away* from the teacher; without this flag
    #: the config refuses it (use ``on_policy_distill``, advantage ``c (tau - s)``, to distill)
    allow_anti_distillation: bool = False
    #: ``K``: also ask the teacher for its top-``K`` tokens at every response position and add
    #: ``top_k_coef * D_beta`` between the teacher's top-``K`` distribution plus a tail bucket
    #: (the remaining mass) and the student's on the same ``K + 1`` buckets. 0: off (the
    #: sampled-token advantage alone)
    teacher_top_k: int = pydantic.Field(0, ge=0, le=64)
    #: ``beta`` of the top-``K`` divergence: 0 forward KL ``KL(teacher || student)``, 1 reverse
    #: KL ``KL(student || teacher)``, in between the generalized JSD
    #: ``beta KL(T || M) + (1-beta) KL(S || M)`` with ``M = beta T + (1-beta) S``
    top_k_beta: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    #: weight of the top-``K`` divergence beside the sampled-token policy loss
    top_k_coef: float = pydantic.Field(1.0, ge=0.0, allow_inf_nan=False)
