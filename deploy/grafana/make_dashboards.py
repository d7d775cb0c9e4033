"""Write the Grafana dashboards of the OPD stack: `python deploy/grafana/make_dashboards.py`.

The JSON files in `deploy/grafana/dashboards/` are generated from the panel lists below (and
checked in); `tests/test_deploy_dashboards.py` fails when they are stale, and checks that every
PromQL expression names only metrics the code exports (docs/metrics.md / docs/design.md §6
names, vLLM's `vllm:*` names).

Three dashboards, all on the provisioned datasource `opd-prometheus`:

- `opd-training`: quality (train/eval accuracy, KL, JSD, lengths), optimisation (losses,
  PPO KL, clip fractions, grad norm, lr, advantages) and policy version / staleness;
- `opd-throughput`: step time and its breakdown, tokens/s of the trainer and of the services,
  rollouts/s, weight-sync time;
- `opd-services`: per service request rate, errors (4xx/5xx), latency percentiles from the
  histograms, queue depth, rejections, engine batch sizes, tokens/s, weight updates, policy
  version, the trainer's per-replica view of its service pools (requests, failures, in flight,
  set aside, latency), and vLLM's own engine metrics (KV-cache use, running/waiting, TTFT,
  preemptions).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "opd-prometheus"}
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"
SVC = 'service=~"$service"'


@dataclass
class Panel:
    """One Grafana panel: a title, PromQL targets (expr, legend) and display settings."""

    title: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    width: int = 8
    height: int = 7
    description: str = ""
    min: float | None = None
    max: float | None = None
    stack: bool = False
    decimals: int | None = None


@dataclass
class Row:
    """A titled row of panels."""

    title: str
    panels: list[Panel] = field(default_factory=list)


def _quantiles(metric: str, by: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99),
               legend: str = "") -> list[tuple[str, str]]:
    """histogram_quantile targets for several quantiles of a `_bucket` histogram."""
    sel = "{" + selector + "}" if selector else ""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[{RATE}])))",
            f"p{round(q * 100)} {legend}".strip(),
        )
        for q in qs
    ]


# --------------------------------------------------------------------------- training

TRAINING: list[Row] = [
    Row("Quality", [
        Panel("Accuracy (train rollouts, eval)", [
            ("opd_rollout_accuracy_mean", "train rollouts"),
            ("opd_eval_accuracy", "eval (greedy, GSM8K test)"),
        ], unit="percentunit", min=0, max=1,
            description="GSM8K correctness of the student's samples (measured, not a loss "
            "term) and of greedy answers on the test split"),
        Panel("Reverse KL per sequence (nats)", [
            ("opd_rollout_kl_divergence_mean", "sum_t (s_t - tau_t)"),
        ], description="mean over the step's samples of sum_t m_t (s_t - tau_t); falls as the "
            "student approaches the teacher"),
        Panel("JSD (per token)", [("opd_rollout_jsd_mean", "jsd")]),
        Panel("Response length (tokens)", [("opd_rollout_response_length_mean", "mean")]),
        Panel("Truncated / format", [
            ("opd_rollout_truncated_frac", "truncated (finish=length)"),
            ("opd_eval_format_rate", "eval answers ending in \\boxed{}"),
        ], unit="percentunit", min=0, max=1),
        Panel("Step", [("opd_trainer_step", "step")], kind="stat", decimals=0),
    ]),
    Row("Optimisation", [
        Panel("Policy-gradient loss", [("opd_actor_pg_loss", "pg_loss")]),
        Panel("PPO KL (new vs behaviour policy)", [("opd_actor_ppo_kl", "ppo_kl")]),
        Panel("Clip fractions", [
            ("opd_actor_pg_clipfrac", "clipfrac"),
            ("opd_actor_pg_clipfrac_lower", "clipfrac lower (dual clip)"),
        ], unit="percentunit", min=0),
        Panel("Gradient norm (before clipping)", [("opd_actor_grad_norm", "grad_norm")]),
        Panel("Learning rate", [("opd_actor_lr", "lr")], unit="sci"),
        Panel("Advantages", [
            ("opd_advantages_mean", "mean"),
            ("opd_advantages_std", "std"),
        ]),
    ]),
    Row("Policy", [
        Panel("Policy version: trainer vs rollout service", [
            ('opd_policy_version{job="trainer"}', "trainer"),
            ('opd_policy_version{service="student_rollout"}', "rollout service"),
        ], decimals=0, width=12),
        Panel("Staleness (batches behind)", [("opd_policy_staleness", "staleness")],
              decimals=0, width=12, min=0),
    ]),
]

# --------------------------------------------------------------------------- throughput

_PHASES = ("rollout", "score", "train", "weight_sync")

THROUGHPUT: list[Row] = [
    Row("Step time", [
        Panel("Step time breakdown (s)", [
            *[(f"opd_timing_{p}_s", p) for p in _PHASES],
        ], unit="s", stack=True, width=12,
            description="stacked phases of the last step; with max_staleness > 0 rollout and "
            "train overlap, so the sum can exceed the step time"),
        Panel("Step time (s)", [("opd_timing_step_s", "step")], unit="s", width=12),
        Panel("Share of the step", [
            *[(f"opd_timing_{p}_s / opd_timing_step_s", p) for p in _PHASES],
        ], unit="percentunit", min=0, width=12),
        Panel("Steps per hour", [
            ("deriv(opd_trainer_step[10m]) * 3600", "steps/h"),
        ], width=12),
    ]),
    Row("Tokens", [
        Panel("Trainer throughput (tokens/s)", [
            ("opd_throughput_tokens_per_s", "trainer"),
        ], unit="short"),
        Panel("Generated tokens/s (rollout)", [
            (f"sum by (service) (rate(opd_tokens_generated_total[{RATE}]))", "{{service}}"),
        ]),
        Panel("Scored tokens/s (teacher)", [
            (f"sum by (service) (rate(opd_tokens_scored_total[{RATE}]))", "{{service}}"),
        ]),
        Panel("Prompt tokens/s", [
            (f"sum by (service) (rate(opd_prompt_tokens_total[{RATE}]))", "{{service}}"),
        ]),
        Panel("Rollouts/s", [
            (f"sum by (service) (rate(opd_rollouts_total[{RATE}]))", "{{service}}"),
        ]),
        Panel("Weight sync (s)", [
            ("opd_timing_weight_sync_s", "trainer: last sync"),
            *_quantiles("opd_weight_update_seconds", "method", qs=(0.5, 0.99),
                        legend="service {{method}}"),
        ], unit="s"),
    ]),
]

# --------------------------------------------------------------------------- services

SERVICES: list[Row] = [
    Row("Traffic", [
        Panel("Up", [('up{job=~"teacher|student_rollout|trainer"}', "{{job}}")],
              kind="stat", decimals=0, width=6),
        Panel("Requests/s by route", [
            (f"sum by (service, route) (rate(opd_requests_total{{{SVC}}}[{RATE}]))",
             "{{service}} {{route}}"),
        ], unit="reqps", width=9),
        Panel("Errors/s (4xx, 5xx)", [
            (f'sum by (service, route, status) (rate(opd_requests_total{{{SVC}, status=~"4..|5.."}}[{RATE}]))',
             "{{service}} {{route}} {{status}}"),
        ], unit="reqps", width=9),
        Panel("5xx ratio", [
            (f'sum by (service) (rate(opd_requests_total{{{SVC}, status=~"5.."}}[{RATE}])) / '
             f"sum by (service) (rate(opd_requests_total{{{SVC}}}[{RATE}]))", "{{service}}"),
        ], unit="percentunit", min=0, width=8),
        Panel("Rejected/s by reason", [
            (f"sum by (service, reason) (rate(opd_rejected_total{{{SVC}}}[{RATE}]))",
             "{{service}} {{reason}}"),
        ], unit="reqps", width=8,
            description="refused before the engine: capacity (429), auth, body size, ..."),
        Panel("Queue depth (admitted, not finished)", [
            (f"opd_queue_depth{{{SVC}}}", "{{service}}"),
        ], decimals=0, min=0, width=8),
    ]),
    Row("Latency", [
        Panel("Request latency by route", _quantiles(
            "opd_request_seconds", "service, route", SVC, legend="{{service}} {{route}}"),
            unit="s", width=12),
        Panel("Mean request latency by route", [
            (f"sum by (service, route) (rate(opd_request_seconds_sum{{{SVC}}}[{RATE}])) / "
             f"sum by (service, route) (rate(opd_request_seconds_count{{{SVC}}}[{RATE}]))",
             "{{service}} {{route}}"),
        ], unit="s", width=12),
    ]),
    Row("Engine", [
        Panel("Engine batch size (sequences per call)", [
            *_quantiles("opd_engine_batch_size", "service, op", SVC, qs=(0.5, 0.99),
                        legend="{{service}} {{op}}"),
            (f"sum by (service, op) (rate(opd_engine_batch_size_sum{{{SVC}}}[{RATE}])) / "
             f"sum by (service, op) (rate(opd_engine_batch_size_count{{{SVC}}}[{RATE}]))",
             "mean {{service}} {{op}}"),
        ]),
        Panel("Tokens/s", [
            (f"sum by (service) (rate(opd_tokens_generated_total{{{SVC}}}[{RATE}]))",
             "generated {{service}}"),
            (f"sum by (service) (rate(opd_tokens_scored_total{{{SVC}}}[{RATE}]))",
             "scored {{service}}"),
            (f"sum by (service) (rate(opd_prompt_tokens_total{{{SVC}}}[{RATE}]))",
             "prompt {{service}}"),
        ]),
        Panel("Rollouts/s", [
            (f"sum by (service) (rate(opd_rollouts_total{{{SVC}}}[{RATE}]))", "{{service}}"),
        ]),
    ]),
    Row("Weights", [
        Panel("Weight updates by result", [
            (f"sum by (service, method, result) (increase(opd_weight_updates_total{{{SVC}}}[{RATE}]))",
             "{{method}} {{result}}"),
        ], stack=True),
        Panel("Weight update time", _quantiles(
            "opd_weight_update_seconds", "service, method", SVC, qs=(0.5, 0.99),
            legend="{{method}}"), unit="s"),
        Panel("Policy version serving", [
            (f"opd_policy_version{{{SVC}}}", "{{service}}"),
        ], decimals=0),
    ]),
    Row("Replica pools (the trainer's view of each replica)", [
        Panel("Requests/s per replica", [
            (f"sum by (pool, replica) (rate(opd_replica_requests_total[{RATE}]))",
             "{{pool}} {{replica}}"),
        ], unit="reqps", width=6,
            description="requests the trainer sent to each teacher and rollout replica "
            "(services.teacher_urls / rollout_urls); the balancing picks the least-loaded one"),
        Panel("Failed requests/s per replica", [
            (f"sum by (pool, replica) (rate(opd_replica_errors_total[{RATE}]))",
             "{{pool}} {{replica}}"),
        ], unit="reqps", width=6,
            description="a transient failure sets the replica aside and the request goes to "
            "another one"),
        Panel("In flight per replica", [
            ("sum by (pool, replica) (opd_replica_in_flight)", "{{pool}} {{replica}}"),
        ], decimals=0, min=0, width=6),
        Panel("Replica in use (1) or set aside (0)", [
            ("min by (pool, replica) (opd_replica_up)", "{{pool}} {{replica}}"),
        ], decimals=0, min=0, max=1, width=6,
            description="0: the replica failed and is probed on /ready until it is back"),
        Panel("Request latency per replica", _quantiles(
            "opd_replica_request_seconds", "pool, replica", qs=(0.5, 0.99),
            legend="{{pool}} {{replica}}"), unit="s", width=24),
    ]),
    Row("vLLM engine (vllm backend only)", [
        Panel("KV-cache usage", [
            ("max by (job) (vllm:kv_cache_usage_perc)", "{{job}}"),
        ], unit="percentunit", min=0, max=1,
            description="vllm:kv_cache_usage_perc, 1 = full; near 1 means preemptions"),
        Panel("Requests running / waiting", [
            ("sum by (job) (vllm:num_requests_running)", "running {{job}}"),
            ("sum by (job) (vllm:num_requests_waiting)", "waiting {{job}}"),
        ], decimals=0),
        Panel("vLLM tokens/s", [
            (f"sum by (job) (rate(vllm:generation_tokens_total[{RATE}]))", "generation {{job}}"),
            (f"sum by (job) (rate(vllm:prompt_tokens_total[{RATE}]))", "prompt {{job}}"),
        ]),
        Panel("Time to first token", _quantiles(
            "vllm:time_to_first_token_seconds", "job", qs=(0.5, 0.99), legend="{{job}}"),
            unit="s"),
        Panel("End-to-end request latency (engine)", _quantiles(
            "vllm:e2e_request_latency_seconds", "job", qs=(0.5, 0.99), legend="{{job}}"),
            unit="s"),
        Panel("Prefix-cache hit rate / preemptions", [
            (f"sum by (job) (rate(vllm:prefix_cache_hits_total[{RATE}])) / "
             f"sum by (job) (rate(vllm:prefix_cache_queries_total[{RATE}]))", "hit rate {{job}}"),
            (f"sum by (job) (rate(vllm:num_preemptions_total[{RATE}]))", "preemptions/s {{job}}"),
        ]),
    ]),
]

SERVICE_VARIABLE: dict[str, Any] = {
    "name": "service",
    "label": "service",
    "type": "query",
    "datasource": DATASOURCE,
    "query": {"query": "label_values(opd_requests_total, service)", "refId": "service"},
    "definition": "label_values(opd_requests_total, service)",
    "includeAll": True,
    "multi": True,
    "allValue": ".*",
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    "refresh": 2,
    "sort": 1,
}

DASHBOARDS: dict[str, dict[str, Any]] = {
    "opd-training": {"title": "OPD / Training", "rows": TRAINING, "vars": []},
    "opd-throughput": {"title": "OPD / Throughput & time", "rows": THROUGHPUT, "vars": []},
    "opd-services": {"title": "OPD / Services", "rows": SERVICES, "vars": [SERVICE_VARIABLE]},
}


# --------------------------------------------------------------------------- rendering


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 25 if panel.stack else 5,
            "showPoints": "never",
            "spanNulls": True,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "range": True,
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def build_dashboard(uid: str) -> dict[str, Any]:
    """The Grafana dashboard JSON model of `uid` (a key of `DASHBOARDS`)."""
    spec = DASHBOARDS[uid]
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in spec["rows"]:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        x, row_height = 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + row_height
                row_height = 0
            panels.append(_panel_json(panel, pid, x, y))
            pid += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    links = [
        {"title": other["title"], "type": "link", "url": f"/d/{other_uid}", "icon": "dashboard"}
        for other_uid, other in DASHBOARDS.items()
        if other_uid != uid
    ]
    return {
        "uid": uid,
        "title": spec["title"],
        "tags": ["opd"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "links": links,
        "templating": {"list": spec["vars"]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{uid}.json": json.dumps(build_dashboard(uid), indent=2, sort_keys=False) + "\n"
        for uid in DASHBOARDS
    }


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards (or, with `--check`, exit 1 when the files are stale)."""
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    stale = []
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        path = OUT_DIR / name
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not check:
            path.write_text(text)
    if check and stale:
        print(f"stale dashboards: {stale}; run python deploy/grafana/make_dashboards.py")
        return 1
    print("written: " + ", ".join(stale) if stale and not check else "dashboards up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
