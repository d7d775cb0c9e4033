"""Replica pools (trainer.pools) and the weight sync over several rollout replicas.

- unit tests against fake replicas (httpx.MockTransport, a fake clock): least-loaded choice
  with round-robin ties, ejection and retry elsewhere, readmission after /ready answers 200
  (and the admission checks), the all-down error naming the pool and each replica's error,
  fatal 4xx not retried elsewhere, scoring chunks spread over the teachers, weights pushed to
  every replica and a returning replica brought to the current version; the config keys;
- end to end on the tiny models with two teacher and two rollout replicas (real uvicorn
  processes): every replica serves and every rollout replica ends at the final version; then
  one teacher and one rollout replica are killed after the first step and the run finishes
  with every step exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.protocol import B64Array
from tests.servers import free_port, start_server
from tests.trainer_runs import _config, _rollout_args
from trainer.cli import train_main
from trainer.clients import RolloutClient, ServiceClient, ServiceError, TeacherClient
from trainer.config import ConfigError, LoggingConfig, load_config
from trainer.observability import Observability, read_metrics, replica_metrics
from trainer.pools import PoolUnavailable, ReplicaPool, TeacherPool
from trainer.retry import RetryPolicy
from trainer.weight_sync import WeightSync

QUICK = RetryPolicy(max_attempts=2, deadline_s=5, initial_s=0.001, max_s=0.001)


class Clock:
    """A fake monotonic clock; ``sleep`` advances it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class Replica:
    """A fake service replica: ``/ready``, a JSON POST route, and the weights routes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits: list[str] = []
        self.down = False  # every request: connection refused
        self.status = 200  # of POST /work
        self.ready = 200
        self.version = 0
        self.gate: threading.Event | None = None  # hold POST /work until set

    @staticmethod
    def _status(version: int) -> dict:
        return {"policy_version": version, "loaded_at": 0.0, "source": "upload"}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused")
        path = request.url.path
        if path == "/ready":
            return httpx.Response(self.ready, json={"status": "x"})
        if path == "/v1/weights" and request.method == "GET":
            return httpx.Response(200, json=self._status(self.version))
        if path == "/v1/weights" and request.method == "PUT":
            version = int(request.url.params["version"])
            if version <= self.version:
                return httpx.Response(409, json={"error": {"message": "not newer"}})
            self.version = version
            self.hits.append(f"weights {version}")
            return httpx.Response(200, json=self._status(version))
        self.hits.append(path)
        if self.gate is not None:
            self.gate.wait(10)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": f"{self.name} says no"}})
        return httpx.Response(200, json={"replica": self.name})


def _pool(fakes: list[Replica], clock: Clock, cls: type = ServiceClient, **kw) -> ReplicaPool:
    clients = [
        cls(
            "teacher",
            f"http://{f.name}",
            retry=QUICK,
            transport=httpx.MockTransport(f),
            sleep=lambda s: None,
        )
        for f in fakes
    ]
    pool_cls = TeacherPool if cls is TeacherClient else ReplicaPool
    return pool_cls(
        "teacher", clients, budget_s=30, probe_interval_s=2, clock=clock, sleep=clock.sleep, **kw
    )


def _work(pool: ReplicaPool) -> str:
    return pool.call(lambda c: c.post_json("/work", {}))["replica"]


def test_round_robin_ties_and_least_loaded_choice() -> None:
    fakes = [Replica("a"), Replica("b"), Replica("c")]
    pool = _pool(fakes, Clock())
    assert [_work(pool) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert _work(pool) == "a"
    # Hold a request at b (next in turn): the others go to a and c only, alternately.
    fakes[1].gate = threading.Event()
    held = threading.Thread(target=_work, args=(pool,))
    held.start()
    deadline = time.monotonic() + 5
    while pool.stats()["http://b"]["in_flight"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [_work(pool) for _ in range(4)] == ["c", "a", "c", "a"]
    fakes[1].gate.set()
    held.join(5)
    assert {url: s["requests"] for url, s in pool.stats().items()} == {
        "http://a": 5,
        "http://b": 3,
        "http://c": 4,
    }


def test_failing_replica_is_ejected_then_readmitted_after_ready() -> None:
    clock = Clock()
    fakes = [Replica("a"), Replica("b")]
    pool = _pool(fakes, clock)
    admitted: list[str] = []
    pool.admission_checks.append(lambda c: admitted.append(c.base_url))
    fakes[0].status = 503  # a transient failure, after its own (short) retry
    assert [_work(pool) for _ in range(3)] == ["b", "b", "b"]
    stats = pool.stats()["http://a"]
    assert stats["live"] is False and "503" in stats["last_error"] and stats["errors"] == 1
    assert fakes[0].hits == ["/work", "/work"]  # QUICK: two attempts, then set aside

    # Not ready yet: probed at most every probe_interval_s, stays out.
    fakes[0].status, fakes[0].ready = 200, 503
    clock.t += 2.5
    assert _work(pool) == "b" and not pool.stats()["http://a"]["live"]
    assert "/ready answered 503" in pool.stats()["http://a"]["last_error"]
    assert admitted == []
    # Ready: taken back (after the admission checks) and used again.
    fakes[0].ready = 200
    assert _work(pool) == "b"  # not yet due
    clock.t += 2.5
    assert {_work(pool) for _ in range(2)} == {"a", "b"}
    assert admitted == ["http://a"] and pool.stats()["http://a"]["live"]


def test_admission_check_failure_keeps_the_replica_out() -> None:
    clock = Clock()
    fakes = [Replica("a"), Replica("b")]
    pool = _pool(fakes, clock)
    pool.eject(pool.clients[0], "killed")  # a failed weight push: one error, set aside
    assert pool.stats()["http://a"]["errors"] == 1 and not pool.stats()["http://a"]["live"]

    def refuse(client: ServiceClient) -> None:
        raise RuntimeError("wrong model")

    pool.admission_checks.append(refuse)
    clock.t += 3
    assert _work(pool) == "b"
    assert "not taken back: RuntimeError: wrong model" in pool.stats()["http://a"]["last_error"]


def test_all_down_fails_after_the_budget_naming_the_pool_and_each_error() -> None:
    clock = Clock()
    fakes = [Replica("a"), Replica("b")]
    pool = _pool(fakes, clock)
    fakes[0].down = True
    fakes[1].status = 502
    with pytest.raises(PoolUnavailable) as info:
        _work(pool)
    message = str(info.value)
    assert "every replica of the teacher pool is down" in message
    assert "retry budget of 30s" in message and "services.retry_timeout_s" in message
    assert "http://a: teacher POST http://a/work" in message and "ConnectError" in message
    assert "http://b: teacher POST http://b/work" in message and "b says no" in message
    assert clock.t - 1000.0 >= 30  # it waited (probing) for the whole budget


def test_fatal_4xx_is_not_retried_on_another_replica() -> None:
    fakes = [Replica("a"), Replica("b")]
    pool = _pool(fakes, Clock())
    fakes[0].status = 400
    with pytest.raises(ServiceError, match="400: a says no"):
        _work(pool)
    assert fakes[0].hits == ["/work"] and fakes[1].hits == []
    assert pool.stats()["http://a"]["live"] and pool.stats()["http://a"]["errors"] == 1


def test_single_replica_pool_passes_errors_through() -> None:
    fake = Replica("a")
    pool = _pool([fake], Clock())
    fake.status = 503
    with pytest.raises(ServiceError, match="gave up after 2 attempt"):
        _work(pool)
    assert pool.stats()["http://a"]["live"]  # nothing to fall back on: never set aside


def _scoring(fake: Replica):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/score":
            return fake(request)
        fake.hits.append(request.url.path)
        data = []
        for i, seq in enumerate(json.loads(request.content)["sequences"]):
            lp = np.full(len(seq["token_ids"]) - seq["start"], -float(seq["token_ids"][0]))
            data.append(
                {
                    "index": i,
                    "start": seq["start"],
                    "token_ids": B64Array.encode(seq["token_ids"], "int32").model_dump(),
                    "logprobs": B64Array.encode(lp.astype(np.float32), "float32").model_dump(),
                }
            )
        usage = {"prompt_tokens": 0, "scored_tokens": 0}
        return httpx.Response(200, json={"model": "t", "data": data, "usage": usage})

    return handler


def test_teacher_pool_spreads_the_chunks_of_one_call() -> None:
    fakes = [Replica("a"), Replica("b")]
    clients = [
        TeacherClient("teacher", f"http://{f.name}", transport=httpx.MockTransport(_scoring(f)))
        for f in fakes
    ]
    pool = TeacherPool("teacher", clients)
    prompts = [[i + 1] for i in range(7)]
    responses = [[5], [], [5, 5], [5, 5, 5], [], [5], [5, 5]]
    out = pool.score(
        prompts, responses, temperature=1.0, sequences_per_request=2, max_concurrency=1
    )
    assert [len(s.logprobs) for s in out] == [len(r) for r in responses]
    for i, s in enumerate(out):
        np.testing.assert_array_equal(s.logprobs, -float(i + 1))
    assert len(fakes[0].hits) == 2 and len(fakes[1].hits) == 1  # 5 sequences: 3 chunks


def test_weights_go_to_every_replica_and_a_returning_one_catches_up(tmp_path: Path) -> None:
    clock = Clock()
    fakes = [Replica("a"), Replica("b")]
    fakes[1].version = 3  # served something before
    pool = _pool(fakes, clock, cls=RolloutClient)
    sync = WeightSync(pool, method="upload", staging_dir=tmp_path / "w")
    write = _writer
    assert sync.start(write) == 4 and [f.version for f in fakes] == [4, 4]
    assert sync.push(write) == 5 and [f.version for f in fakes] == [5, 5]

    # b goes down: the push reaches a alone, b is set aside.
    fakes[1].down = True
    assert sync.push(write) == 6 and fakes[0].version == 6 and fakes[1].version == 5
    assert pool.live() == [pool.clients[0]]
    # b comes back restarted (version 0): it serves 6 before it gets a request again.
    fakes[1].down, fakes[1].version = False, 0
    clock.t += 3
    fakes[1].hits.clear()
    assert {_rollout_work(pool) for _ in range(2)} == {"a", "b"}
    assert fakes[1].hits[0] == "weights 6" and fakes[1].version == 6

    # A restart nobody noticed: the answer's policy_version is older than what was pushed.
    fakes[0].version = 0
    assert sync.restore(0, sync.version, pool.clients[0]) and fakes[0].version == 6
    assert not sync.restore(6, 6, pool.clients[0])


def _rollout_work(pool: ReplicaPool) -> str:
    return pool.call(lambda c: c.post_json("/work", {}))["replica"]


def _writer(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


def test_replica_metrics_are_exported_by_the_trainer(tmp_path: Path) -> None:
    port = free_port()
    cfg = LoggingConfig(
        metrics_port=port, metrics_host="127.0.0.1", tensorboard=False, progress_bar=False
    )
    pool = _pool([Replica("m1"), Replica("m2")], Clock())
    _work(pool)
    obs = Observability(tmp_path, cfg, total_steps=1)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        obs.close()
    assert 'opd_replica_requests_total{pool="teacher",replica="http://m1"} 1.0' in text
    for name in (
        "opd_replica_errors_total",
        "opd_replica_in_flight",
        "opd_replica_up",
        "opd_replica_request_seconds_bucket",
    ):
        assert re.search(rf'^{name}{{.*replica="http://m2"', text, re.M), name


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["services.teacher_url=http://a:1", "services.teacher_urls=[http://b:1]"],
            "services.teacher_url and services.teacher_urls are both set",
        ),
        (["services.rollout_urls=[http://a:1, b:2]"], "services.rollout_urls 'b:2' is not"),
        (["services.rollout_urls=[]"], "services.rollout_urls is empty"),
        (["services.teacher_urls=[http://a:1, http://a:1]"], "lists a URL twice"),
    ],
)
def test_config_refuses_bad_pools(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, ["student.model=s", *overrides])


def test_config_pool_urls() -> None:
    cfg = load_config(None, ["student.model=s", "services.teacher_urls=[http://a:1, http://b:1]"])
    assert cfg.services.pool_urls("teacher") == ["http://a:1", "http://b:1"]
    assert cfg.services.pool_urls("rollout") == ["http://localhost:8002"]
    cfg = load_config(None, ["student.model=s", "services.rollout_url=http://r:2"])
    assert cfg.services.pool_urls("rollout") == ["http://r:2"]


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def replicas(tiny_models, tmp_path_factory):
    """Two teacher and two rollout replicas (hf backend, tiny models) on CPU."""
    teacher_args = ["--model", str(tiny_models["teacher"]), "--backend", "hf", "--device", "cpu"]
    handles = {
        "teacher": [start_server("services.teacher", teacher_args, wait=False) for _ in "ab"],
        "rollout": [
            start_server(
                "services.student_rollout",
                _rollout_args(tiny_models["student"], tmp_path_factory.mktemp(f"w{i}")),
                wait=False,
            )
            for i in range(2)
        ],
    }
    everything = handles["teacher"] + handles["rollout"]
    try:
        for handle in everything:
            handle.wait_ready(240)
        yield handles
    finally:
        for handle in everything:
            handle.stop()


def _pool_config(tmp_path, replicas, tiny_models, gsm8k_dir, name: str, steps: int) -> Path:
    """4 prompts x 2 samples x 16 tokens; two rollout and two score requests per step."""
    urls = {pool: [h.base_url for h in replicas[pool]] for pool in ("teacher", "rollout")}
    svc = {"teacher": replicas["teacher"][0], "rollout": replicas["rollout"][0]}
    return _config(
        tmp_path,
        svc,
        tiny_models,
        gsm8k_dir,
        name,
        rollout={
            "prompts_per_step": 4,
            "samples_per_prompt": 2,
            "max_tokens": 16,
            "prompts_per_request": 2,
        },
        teacher={"sequences_per_request": 4},
        trainer={"total_steps": steps},
        eval={"at_start": False, "at_end": False, "kl_prompts": 0},
        checkpoint={"interval": 0, "at_end": False},
        services={
            "teacher_url": None,
            "rollout_url": None,
            "teacher_urls": urls["teacher"],
            "rollout_urls": urls["rollout"],
            "max_concurrency": 2,
            "retry_timeout_s": 60,
        },
    )


def _served(base_url: str, route: str) -> float:
    """Requests a service answered 200 on ``route`` (its own /metrics)."""
    text = httpx.get(base_url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("opd_requests_total{")
        and f'route="{route}"' in line
        and 'status="200"' in line
    )


def _trainer_counts(pool: str, urls: list[str]) -> dict[str, tuple[float, float]]:
    """The trainer's (requests, errors) per replica, from its replica metrics."""
    registry = CollectorRegistry()
    for collector in replica_metrics().collectors():
        registry.register(collector)
    return {
        url: tuple(
            registry.get_sample_value(f"opd_replica_{kind}_total", {"pool": pool, "replica": url})
            or 0.0
            for kind in ("requests", "errors")
        )
        for url in urls
    }


def _version(base_url: str) -> int:
    return RolloutClient("rollout", base_url).weights_status().policy_version


@pytest.mark.slow
def test_two_teachers_and_two_rollout_replicas(tmp_path, replicas, tiny_models, gsm8k_dir):
    cfg = _pool_config(tmp_path, replicas, tiny_models, gsm8k_dir, "pools", steps=2)
    assert train_main([str(cfg)]) == 0
    records = read_metrics(tmp_path / "pools")
    assert [r["step"] for r in records] == [1, 2]
    for handle in replicas["teacher"]:
        assert _served(handle.base_url, "/v1/score") > 0, handle.base_url
    final = int(records[-1]["policy/version"]) + 1  # the version that sampled, then the push
    for handle in replicas["rollout"]:
        assert _served(handle.base_url, "/v1/rollouts") > 0, handle.base_url
        assert _version(handle.base_url) == final, handle.base_url
    counts = _trainer_counts("teacher", [h.base_url for h in replicas["teacher"]])
    assert all(requests > 0 and errors == 0 for requests, errors in counts.values()), counts


@pytest.mark.slow
def test_run_survives_losing_a_teacher_and_a_rollout_replica(
    tmp_path, replicas, tiny_models, gsm8k_dir
):
    cfg = _pool_config(tmp_path, replicas, tiny_models, gsm8k_dir, "losing", steps=2)
    victims = [replicas["teacher"][1], replicas["rollout"][1]]
    urls = [h.base_url for h in victims]
    before = {**_trainer_counts("teacher", urls[:1]), **_trainer_counts("rollout", urls[1:])}
    killed = threading.Event()

    def kill_after_first_step() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not read_metrics(tmp_path / "losing"):
            time.sleep(0.02)
        for handle in victims:  # step 1's weights have landed: it is logged after the push
            os.killpg(handle.proc.pid, signal.SIGKILL)
            handle.proc.wait(10)
        killed.set()

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    assert train_main([str(cfg)]) == 0
    killer.join(10)
    assert killed.is_set()
    records = read_metrics(tmp_path / "losing")
    assert [r["step"] for r in records] == [1, 2]
    assert _version(replicas["rollout"][0].base_url) == int(records[-1]["policy/version"]) + 1
    after = {**_trainer_counts("teacher", urls[:1]), **_trainer_counts("rollout", urls[1:])}
    # Each victim was sent a request after it died (and failed it): it was set aside.
    assert all(after[u][1] > before[u][1] for u in urls), (before, after)
