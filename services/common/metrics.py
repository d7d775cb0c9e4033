"""Prometheus metrics of the services (names fixed in docs/metrics.md) and `/metrics`.

All metrics live in prometheus_client's default registry, so `/metrics` also shows what else
registered there: vLLM's `vllm:*` metrics when that backend runs in-process, and the Python
process collectors. Every metric has a `service` label (`teacher` | `student_rollout`).
Request metrics are labelled with the route *template* (`/v1/score`), never the raw path, so
a scan of random URLs cannot blow up the number of series (unmatched paths are `unmatched`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# Module-level: a metric can be registered once per process, and tests build many apps.
REQUESTS = Counter("opd_requests", "HTTP requests by route template and status",
                   ["service", "route", "status"])
REQUEST_SECONDS = Histogram("opd_request_seconds", "HTTP request latency (seconds)",
                            ["service", "route"], buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("opd_prompt_tokens", "prompt tokens received", ["service"])
TOKENS_SCORED = Counter("opd_tokens_scored", "tokens scored (/v1/score and echo scoring)",
                        ["service"])
TOKENS_GENERATED = Counter("opd_tokens_generated", "completion tokens generated", ["service"])
ENGINE_BATCH_SIZE = Histogram("opd_engine_batch_size", "sequences per engine call",
                              ["service", "op"], buckets=_BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("opd_queue_depth", "requests admitted and not yet finished", ["service"])
REJECTED = Counter("opd_rejected", "requests refused before reaching the engine",
                   ["service", "reason"])
ROLLOUTS = Counter("opd_rollouts", "trajectories returned", ["service"])
WEIGHT_UPDATES = Counter("opd_weight_updates", "weight updates by method and result",
                         ["service", "method", "result"])
WEIGHT_UPDATE_SECONDS = Histogram("opd_weight_update_seconds", "weight update time (seconds)",
                                  ["service", "method"], buckets=_LATENCY_BUCKETS)
POLICY_VERSION = Gauge("opd_policy_version", "weights version now serving", ["service"])


class ServiceMetrics:
    """The metrics above with the `service` label bound; what routes call."""

    def __init__(self, service: str) -> None:
        self.service = service
        # Create the unlabelled-by-request series up front so dashboards see zeros, not gaps.
        QUEUE_DEPTH.labels(service).set(0)
        for counter in (PROMPT_TOKENS, TOKENS_SCORED, TOKENS_GENERATED):
            counter.labels(service)

    def request(self, route: str, status: int, seconds: float) -> None:
        """One finished HTTP request."""
        REQUESTS.labels(self.service, route, str(status)).inc()
        REQUEST_SECONDS.labels(self.service, route).observe(seconds)

    def prompt_tokens(self, n: int) -> None:
        """Prompt tokens received (generate) or sequence tokens received (score)."""
        PROMPT_TOKENS.labels(self.service).inc(n)

    def tokens_scored(self, n: int) -> None:
        """Tokens whose logprobs were returned by scoring."""
        TOKENS_SCORED.labels(self.service).inc(n)

    def tokens_generated(self, n: int) -> None:
        """Completion tokens sampled."""
        TOKENS_GENERATED.labels(self.service).inc(n)

    def engine_batch(self, op: str, sequences: int) -> None:
        """One engine call of `op` ("score" | "generate") over `sequences` sequences."""
        ENGINE_BATCH_SIZE.labels(self.service, op).observe(sequences)

    def queue_depth(self, depth: int) -> None:
        """Requests admitted and not finished."""
        QUEUE_DEPTH.labels(self.service).set(depth)

    def rejected(self, reason: str) -> None:
        """A request refused: "capacity", "auth", "body_size", "timeout", "not_ready", ..."""
        REJECTED.labels(self.service, reason).inc()

    def rollouts(self, n: int) -> None:
        """Trajectories returned by the rollout service."""
        ROLLOUTS.labels(self.service).inc(n)

    def weight_update(self, method: str, result: str, seconds: float | None = None) -> None:
        """One weight update (`method` "load" | "upload"; `result` "ok" | "rejected" | "error")."""
        WEIGHT_UPDATES.labels(self.service, method, result).inc()
        if seconds is not None:
            WEIGHT_UPDATE_SECONDS.labels(self.service, method).observe(seconds)

    def policy_version(self, version: int) -> None:
        """The weights version now serving."""
        POLICY_VERSION.labels(self.service).set(version)


def route_template(app: Any, scope: Any) -> str:
    """The matched route's path template (`/v1/score`), or `unmatched`.

    FastAPI leaves the matched route in `scope["route"]`; requests refused before routing
    (401, 413, 429) are matched here against the app's routes instead.
    """
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    for candidate in getattr(app, "routes", ()):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


class MetricsMiddleware:
    """ASGI middleware: count each request by route template and status, time it."""

    def __init__(self, app: Any, metrics: ServiceMetrics, router_app: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.router_app = router_app  # the FastAPI app, for route templates

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(route_template(self.router_app, scope), status,
                                 time.perf_counter() - start)


def _registry() -> CollectorRegistry:
    # vLLM with several API-server processes writes metrics to PROMETHEUS_MULTIPROC_DIR;
    # collect from there when set, else the process's default registry.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def metrics_router() -> APIRouter:
    """`GET /metrics`: Prometheus text of the default registry (`vllm:*` included)."""
    router = APIRouter()

    @router.get("/metrics", tags=["probes"], response_class=Response, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus metrics (open even when an API key is set)."""
        return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)

    return router
