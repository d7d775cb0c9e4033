"""Metric names: those the code registers, those the docs fix, those a PromQL expression uses.

`exported_metric_names()` is the one place that says what "exported" means: today the names
the code registers (services.common.metrics, trainer.observability), the names fixed in
docs/metrics.md and docs/design.md §6, vLLM's `vllm:*` names read from the installed
vLLM's source, plus whatever live `/metrics` endpoints listed in `OPD_METRICS_URLS` expose.
Swap it (or set that variable, e.g. to servers started with tests/servers.py) to check the
dashboards against running services.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
from pathlib import Path

from tests.scripts import REPO_ROOT

METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
DESIGN_DOC = REPO_ROOT / "docs" / "design.md"

# Metrics Prometheus makes itself for every target.
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _expand(name: str, kind: str) -> set[str]:
    """Exposition names of one metric family (prometheus_client conventions)."""
    base = name.removesuffix("_total") if kind == "counter" else name
    if kind == "counter":
        return {f"{base}_total", f"{base}_created"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
    if kind == "summary":
        return {base, f"{base}_sum", f"{base}_count", f"{base}_created"}
    return {base}


def design_scalars() -> list[str]:
    """The trainer scalars fixed in docs/design.md section 6 (the code block there)."""
    text = DESIGN_DOC.read_text()
    match = re.search(r"^## 6\..*?(?=^## 7\.)", text, re.S | re.M)
    assert match, "docs/design.md has no section 6"
    block = re.search(r"```\n(.*?)```", match.group(0), re.S)
    assert block, "docs/design.md section 6 has no list of scalars"
    return block.group(1).split()


def step_scalars() -> tuple[str, ...]:
    """The scalars the trainer logs every step, as the code defines them."""
    from trainer import observability

    return tuple(observability.STEP_SCALARS)


def _trainer_name(key: str) -> str:
    return "opd_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def documented_metric_names() -> set[str]:
    """Names fixed in docs/metrics.md (service metrics) and docs/design.md §6 (trainer)."""
    names: set[str] = set()
    if METRICS_DOC.is_file():
        for name, kind in re.findall(
            r"^\s+(opd_[a-z0-9_]+)(?:\{[^}]*\})?\s+(counter|histogram|gauge)\b",
            METRICS_DOC.read_text(),
            re.M,
        ):
            names |= _expand(name, kind)
        if "opd_trainer_step" in METRICS_DOC.read_text():
            names.add("opd_trainer_step")
    names |= {_trainer_name(key) for key in design_scalars()}
    return names


def code_metric_names() -> set[str]:
    """Names the code registers: the services' metrics module, the trainer's scalars and its
    per-replica pool metrics."""
    names: set[str] = set()
    from prometheus_client.metrics import MetricWrapperBase

    from trainer.observability import prometheus_name, replica_metrics

    metrics = importlib.import_module("services.common.metrics")
    for value in [*vars(metrics).values(), *replica_metrics().collectors()]:
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names |= _expand(family.name, family.type)
    names |= {prometheus_name(k) for k in step_scalars()}
    names.add("opd_trainer_step")
    return names


def _vllm_package_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")  # located, not imported (importing is slow)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def vllm_metric_names() -> frozenset[str]:
    """`vllm:*` exposition names, read from the installed vLLM's v1 metrics source."""
    root = _vllm_package_dir()
    if root is None:
        return frozenset()
    names: set[str] = set()
    for file in (root / "v1" / "metrics").glob("*.py"):
        text = file.read_text()
        for kind, name in re.findall(
            r"_(counter|gauge|histogram)_cls\(\s*name=\"(vllm:[a-z0-9_:]+)\"", text
        ):
            names |= _expand(name, kind)
    return frozenset(names)


def scrape_metric_names(url: str, timeout: float = 10.0) -> set[str]:
    """Sample and family names in a live Prometheus text exposition (`GET url`)."""
    import httpx

    text = httpx.get(url, timeout=timeout).text
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names |= _expand(name, kind.strip())
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def exported_metric_names() -> set[str]:
    """Every metric name a dashboard may use (see the module docstring)."""
    names = set(PROMETHEUS_BUILTIN) | code_metric_names() | documented_metric_names()
    names |= vllm_metric_names()
    for url in filter(None, os.environ.get("OPD_METRICS_URLS", "").split(",")):
        names |= scrape_metric_names(url.strip())
    return names


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "le",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, labels, keywords and numbers dropped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", s)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token, before = match.group(0), s[: match.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the exponent of a number such as 1e-5
        if s[match.end() :].lstrip().startswith("(") or token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names
