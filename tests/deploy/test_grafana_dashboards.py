"""deploy/grafana: the dashboard JSON files are what deploy/grafana/dashboards.py generates with
grafana-foundation-sdk (no hand edits, no drift), each dashboard has the panels on-call needs, every recording rule a panel
reads is defined, and provisioning points Grafana at them. That every panel's query returns
data from the running services is tests/integration/test_dashboards_prometheus.py."""

from __future__ import annotations

import json
import pathlib
import re

import yaml
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel
from grafana_foundation_sdk.models.prometheus import Dataquery as PrometheusQuery

from deploy.grafana import dashboards

ROOT = pathlib.Path(__file__).absolute().parents[2]  # not resolve(): under Bazel the runfiles tree is the root
GRAFANA = ROOT / "deploy" / "grafana"


def test_the_committed_dashboards_are_the_generated_ones(tmp_path):
    assert dashboards.main(["--check", "--output_dir", str(GRAFANA / "dashboards")]) == 0
    assert sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json")) == [
        "dataprep.json", "overview.json", "serving.json", "trainer.json"]
    stale = tmp_path / "dashboards"
    assert dashboards.main(["--output_dir", str(stale)]) == 0
    (stale / "serving.json").write_text((stale / "serving.json").read_text().replace("tuneforge_", "vllm_"))
    assert dashboards.main(["--check", "--output_dir", str(stale)]) == 1


def test_each_dashboard_has_the_panels_on_call_reads():
    titles = {name: {p.title for p in dashboards.panels(d)} for name, d in dashboards.DASHBOARDS.items()}
    assert {"Targets up", "Requests per second", "Server-error ratio", "5xx ratio", "Latency p95"} <= titles["overview"]
    assert {"Rows per second", "Rejected rows per second by reason", "Packing efficiency",
            "Bytes served per second"} <= titles["dataprep"]
    assert {"Jobs by state", "Loss", "Tokens per second", "Step time", "Data wait share of step time",
            "Checkpoints published per job", "Online step time split"} <= titles["trainer"]
    assert {"Requests per second", "Errors per second by model and code", "Time to first token",
            "Inter-token latency p95", "Adapters ready", "Adapter load time", "Hot-load time by part (mean, 1 h)",
            "KV-cache usage",
            "Scheduler"} <= titles["serving"]


def test_rendered_json_is_a_grafana_dashboard_with_unique_ids_and_a_query_per_target():
    for name, text in dashboards.files().items():
        board = json.loads(text)
        assert board["uid"].startswith("tuneforge-") and board["schemaVersion"] == 36  # Grafana 10.1's
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        queries = [p for p in board["panels"] if p["type"] != "row"]
        assert queries and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in queries), name
        assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for p in queries)
        assert all([t["refId"] for t in p["targets"]] == ["A", "B", "C"][:len(p["targets"])] for p in queries), name
        assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
        # no two panels overlap on the grid
        cells = set()
        for p in board["panels"]:
            g = p["gridPos"]
            for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
                assert cell not in cells, f"{name}: {p['title']} overlaps"
                cells.add(cell)


def test_the_committed_json_decodes_as_the_sdks_dashboard_model_with_every_query():
    register_default_plugins()  # so that panels and Prometheus queries decode as their own types
    for name, built in dashboards.DASHBOARDS.items():
        board = DashboardModel.from_json(json.loads((GRAFANA / "dashboards" / f"{name}.json").read_text()))
        assert all(isinstance(t, PrometheusQuery) for p in dashboards.panels(board) for t in p.targets), name
        assert dashboards.exprs(board) == dashboards.exprs(built), name


def test_every_recording_rule_a_panel_reads_is_defined():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "recording.rules.yml").read_text())["groups"]
    defined = {rule["record"] for group in rules for rule in group["rules"]}
    used = {name for d in dashboards.DASHBOARDS.values() for _title, expr in dashboards.exprs(d)
            for name in re.findall(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", expr)}
    assert used and used <= defined, used - defined


def test_provisioning_loads_the_dashboards_folder_from_prometheus():
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [(d["type"], d["url"]) for d in source["datasources"]] == [("prometheus", "http://prometheus:9090")]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tuneforge.yml").read_text())["providers"]
    assert [(p["type"], p["folder"]) for p in provider] == [("file", "TuneForge")]
