"""The Helm chart's metrics: Prometheus scrape annotations, the ServiceMonitor's jobs (the
names the dashboards use), and the Grafana dashboards and datasource it ships, the same files
as compose's deploy/grafana/dashboards/.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.code_defaults import trainer_metrics_port
from tests.helm_render import (
    EVERYTHING,
    RELEASE,
    chart,
    find,
    render,
    trainer_job,
)
from tests.scripts import REPO_ROOT

DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"


def test_scrape_annotations_and_service_monitor() -> None:
    docs = render(EVERYTHING)
    for component, port in (("teacher", 8001), ("rollout", 8002)):
        sts = find(docs, "StatefulSet", f"{RELEASE}-{component}")
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }
    single = trainer_job(render())["spec"]["template"]["metadata"]["annotations"]
    assert single["prometheus.io/port"] == str(trainer_metrics_port())
    monitor = find(docs, "ServiceMonitor", RELEASE)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        d
        for d in docs
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    jobs = set()
    for service in scraped:
        names = {p["name"] for p in service["spec"]["ports"]}
        assert len(names & endpoint_ports) == 1, service["metadata"]["name"]
        jobs.add(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
    # the job names the dashboards (and compose's deploy/prometheus.yml) use
    assert {"teacher", "student_rollout", "trainer"} <= jobs
    dashboards = " ".join(f.read_text() for f in DASHBOARD_DIR.glob("*.json"))
    for regex in re.findall(r'job=~\\"([^\\]+)\\"', dashboards):
        assert set(regex.split("|")) <= jobs
    for job in re.findall(r'job=\\"([a-z_]+)\\"', dashboards):
        assert job in jobs
    # each pool is scraped pod by pod (the headless Services), not through the ClusterIP one
    assert {s["metadata"]["name"] for s in scraped} == {
        f"{RELEASE}-teacher-headless",
        f"{RELEASE}-rollout-headless",
        f"{RELEASE}-trainer-metrics",
        f"{RELEASE}-router-metrics",
    }


def test_grafana_dashboards_are_the_compose_files() -> None:
    files = {f.name: f.read_text() for f in sorted(DASHBOARD_DIR.glob("*.json"))}
    assert files
    # the chart's dashboards/ (a link to deploy/grafana/dashboards/) as Helm loads it
    chart_files = {
        Path(f["name"]).name: f["data"]
        for f in chart().files
        if f["name"].startswith("dashboards/")
    }
    assert chart_files == files
    docs = render()
    maps = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    rendered = {name: text for d in maps for name, text in d["data"].items()}
    assert rendered == files, "the chart's dashboards differ from deploy/grafana/dashboards/"
    for d in maps:
        assert d["metadata"]["annotations"]["grafana_folder"] == "OPD"
    datasource = find(render(EVERYTHING), "ConfigMap", f"{RELEASE}-datasource")
    uids = {m for text in files.values() for m in re.findall(r'"uid": "(opd-prometheus)"', text)}
    assert (
        yaml.safe_load(datasource["data"]["opd-datasource.yaml"])["datasources"][0]["uid"] in uids
    )
