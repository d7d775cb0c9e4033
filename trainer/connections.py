"""Rank 0's connections to the two service pools: the teacher, the rollout service, the weight sync.

Built from ``services.*`` and ``sync.*`` of the config. Each service is a
:class:`~trainer.pools.ReplicaPool` of one or more replicas (``services.teacher_urls`` /
``services.rollout_urls``, else the single URL): requests are balanced over the live
replicas; weights go to every rollout replica (:class:`~trainer.weight_sync.WeightSync`).
:meth:`Services.connect` waits for the replicas and runs the start-up checks;
:meth:`Services.rollouts` notices a rollout replica that restarted and lost the trainer's
weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.protocol import InfoResponse, RolloutResponse
from trainer.clients import (
    RolloutClient,
    ServiceClient,
    ServiceUnavailable,
    TeacherClient,
    map_concurrently,
)
from trainer.config import TrainConfig
from trainer.errors import FatalError, StartupError
from trainer.pools import PoolUnavailable, ReplicaPool, TeacherPool
from trainer.retry import RetryPolicy
from trainer.service_checks import check_services
from trainer.weight_sync import WeightSync

if TYPE_CHECKING:
    from trainer.broadcast_sync import BroadcastSender

__all__ = ["Services", "connect_services", "replica_retry"]

log = logging.getLogger("opd.trainer")


def replica_retry(full: RetryPolicy) -> RetryPolicy:
    """A replica's own retry inside a pool of several: a few quick attempts, then the pool
    sets it aside and sends the request to another replica (the pool keeps the full budget)."""
    return RetryPolicy(
        max_attempts=min(full.max_attempts, 3),
        deadline_s=min(full.deadline_s, 10.0),
        initial_s=full.initial_s,
        max_s=min(full.max_s, 2.0),
    )


class Services:
    """Rank 0's connections: the teacher pool, the rollout pool, and the weight sync."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        s = cfg.services
        retry = RetryPolicy(
            max_attempts=s.max_attempts,
            deadline_s=s.retry_timeout_s,
            initial_s=s.backoff_initial_s,
            max_s=s.backoff_max_s,
        )
        common: dict[str, Any] = {
            "api_key": os.environ.get(s.api_key_env) or None,
            "timeout_s": s.request_timeout_s,
            "max_connections": s.max_concurrency,
        }

        def replicas(cls: type[ServiceClient], name: str) -> list[Any]:
            urls = s.pool_urls(name)  # type: ignore[arg-type]
            policy = retry if len(urls) == 1 else replica_retry(retry)
            return [cls(name, url, retry=policy, **common) for url in urls]

        self.cfg = cfg
        self.teacher = TeacherPool(
            "teacher", replicas(TeacherClient, "teacher"), budget_s=s.retry_timeout_s
        )
        self.rollout: ReplicaPool[RolloutClient] = ReplicaPool(
            "rollout", replicas(RolloutClient, "rollout"), budget_s=s.retry_timeout_s
        )
        self._reference: dict[str, InfoResponse] = {}
        for pool in (self.teacher, self.rollout):
            pool.admission_checks.append(partial(self._same_as_at_start, pool.name))
        # Registers the weight catch-up as the rollout pool's (second) admission check.
        self.sync = WeightSync(
            self.rollout,
            method=cfg.sync.method,
            staging_dir=run_dir / "weights",
            shared_dir=Path(cfg.sync.shared_dir) if cfg.sync.shared_dir else None,
            service_dir=cfg.sync.service_dir,
            broadcaster=partial(_broadcast_sender, cfg) if cfg.sync.method == "broadcast" else None,
        )

    def connect(self, local_fingerprint: str | None) -> tuple[InfoResponse, InfoResponse]:
        """Wait for every replica (at once, up to ``services.ready_timeout_s``) and check
        they fit together (raises StartupError). A pool starts with the replicas that are
        ready; the others are set aside and join when their ``/ready`` answers 200. Returns
        the first ready teacher's and rollout replica's ``/info``."""
        timeout = self.cfg.services.ready_timeout_s
        pools = (self.teacher, self.rollout)
        everyone = [(pool, client) for pool in pools for client in pool.clients]

        def wait(item: tuple[ReplicaPool[Any], ServiceClient]) -> InfoResponse | Exception:
            try:
                return item[1].wait_ready(timeout)
            except ServiceUnavailable as exc:
                return exc

        ready: dict[str, list[tuple[ServiceClient, InfoResponse]]] = {p.name: [] for p in pools}
        errors: dict[str, dict[str, str]] = {p.name: {} for p in pools}
        for (pool, client), got in zip(
            everyone, map_concurrently(wait, everyone, len(everyone)), strict=True
        ):
            if isinstance(got, InfoResponse):
                ready[pool.name].append((client, got))
            elif len(pool.clients) == 1:
                raise got  # the single-service message: is it running, which URL
            else:
                errors[pool.name][client.base_url] = str(got)
                pool.eject(client, got)
        for pool in pools:
            if not ready[pool.name]:
                raise PoolUnavailable(
                    pool.name, f"none ready after {timeout:.0f}s", errors[pool.name]
                )
            for url in errors[pool.name]:
                log.warning("%s replica %s is not ready; starting without it", pool.name, url)
        (t_client, t_info), (r_client, r_info) = ready["teacher"][0], ready["rollout"][0]
        pairs = [(c, i, r_client, r_info) for c, i in ready["teacher"]]
        pairs += [(t_client, t_info, c, i) for c, i in ready["rollout"][1:]]
        for tc, ti, rc, ri in pairs:
            key = "tokenizer_fingerprint_components"
            t_parts, r_parts = tc.info_raw.get(key), rc.info_raw.get(key)
            both = isinstance(t_parts, dict) and isinstance(r_parts, dict)
            check_services(
                self.cfg, ti, ri, local_fingerprint, (t_parts, r_parts) if both else None
            )
        self._reference = {"teacher": t_info, "rollout": r_info}
        return t_info, r_info

    def _same_as_at_start(self, pool: str, client: ServiceClient) -> None:
        """Admission check: a replica taken back serves what the pool served at start."""
        ref = self._reference.get(pool)
        if ref is None:
            return
        info = client.info()
        if (info.service, info.model, info.tokenizer_fingerprint) != (
            ref.service,
            ref.model,
            ref.tokenizer_fingerprint,
        ):
            raise StartupError(
                f"{client.base_url} serves {info.service} {info.model!r} (tokenizer "
                f"{info.tokenizer_fingerprint[:16]}...), but the {pool} pool started with "
                f"{ref.service} {ref.model!r} ({ref.tokenizer_fingerprint[:16]}...)"
            )

    # RolloutClient.rollouts' signature on purpose: this wrapper forwards every argument.
    def rollouts(
        self,
        prompts: Sequence[dict[str, Any]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> RolloutResponse:
        """``/v1/rollouts`` on the least-loaded live rollout replica, noticing a restart.

        A restarted replica serves its initial weights at version 0: the answer's
        ``policy_version`` is then below what was confirmed before the request was sent.
        The current weights are pushed to it again and the request repeated.
        """

        def sample(replica: RolloutClient) -> RolloutResponse:
            for _ in range(3):
                expected = self.sync.version
                resp = replica.rollouts(
                    prompts, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed
                )
                served = min((it.policy_version for it in resp.data), default=resp.policy_version)
                if not self.sync.restore(served, expected, replica):
                    return resp
            raise FatalError(
                f"the rollout replica {replica.base_url} keeps losing its weights (restarting "
                "in a loop?)"
            )

        return self.rollout.call(sample)

    def close(self) -> None:
        """Close the broadcast group (if any) and the HTTP clients."""
        self.sync.close()
        self.teacher.close()
        self.rollout.close()


def connect_services(cfg: TrainConfig, run_dir: Path, tokenizer_path: str) -> Services:
    """Connect to both services and check them against the student tokenizer at
    ``tokenizer_path`` (what the trainer computes logprobs with)."""
    from transformers import AutoTokenizer

    from services.engine import tokenizer_fingerprint

    local = tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=cfg.student.trust_remote_code
        )
    )
    services = Services(cfg, run_dir)
    try:
        teacher, rollout = services.connect(local)
    except BaseException:
        services.close()
        raise
    log.info(
        "teacher %s (%s, %s) and rollout %s (%s, policy_version %s) ready; tokenizers match",
        teacher.model,
        teacher.backend,
        teacher.device,
        rollout.model,
        rollout.backend,
        rollout.policy_version,
    )
    return services


def _broadcast_sender(cfg: TrainConfig, replicas: list[RolloutClient]) -> BroadcastSender:
    """The ``sync.method: broadcast`` sender for these rollout replicas."""
    from trainer.broadcast_sync import BroadcastSender, default_master_addr

    s = cfg.sync
    return BroadcastSender(
        replicas,
        master_addr=s.broadcast_addr or default_master_addr(replicas),
        master_port=s.broadcast_port,
        backend=s.broadcast_backend,
        bucket_bytes=int(s.bucket_mb * 2**20),
        timeout_s=s.broadcast_timeout_s,
    )
