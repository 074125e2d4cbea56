"""TuneForge's Grafana dashboards as code: one overview across the three services and one per
service, each panel a PromQL query over the metrics the services export and the recording
rules in deploy/prometheus. `python -m deploy.grafana.dashboards` writes them to
deploy/grafana/dashboards/*.json (provisioned by deploy/grafana/provisioning); `--check`
exits 1 when the files differ from this module.

Neither grafana-foundation-sdk nor grafanalib is installed in this project's environment, so
this module holds the small part of a dashboard builder it needs (panels, targets, grid layout,
the Prometheus data-source variable), writing Grafana's dashboard JSON (schemaVersion 39).
Swapping it for grafana-foundation-sdk's builders keeps DASHBOARDS' queries as they are."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import dataclass, field

OUT = pathlib.Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SERVICES = 'job=~"dataprep|trainer|serving"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...] = field(default_factory=tuple)

    def panels(self):
        return [panel for row in self.rows for panel in row.panels]


def panel(title: str, *targets: Target | str, unit: str = "short", description: str = "",
          kind: str = "timeseries") -> Panel:
    return Panel(title, tuple(t if isinstance(t, Target) else Target(t) for t in targets), unit, description, kind)


# -- the dashboards ----------------------------------------------------------------------------

def quantiles(metric: str, by: str = "", selector: str = "") -> tuple[Target, ...]:
    """p50 and p95 of a histogram over 5 minutes, per `by` label (none: all series together)."""
    return tuple(Target(f"histogram_quantile({q}, sum by ({by + ', ' if by else ''}le) "
                        f"(rate({metric}_bucket{selector}[5m])))",
                        f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))
                 for q in (0.5, 0.95))


OVERVIEW = Dashboard("tuneforge-overview", "TuneForge / Overview",
                     "Health and RED (rate, errors, duration) of dataprep, trainer and serving.", (
    Row("Health", (
        panel("Targets up", Target(f"up{{{SERVICES}}}", "{{job}} {{instance}}"), kind="stat",
              description="1: Prometheus scraped the service's /metrics; 0: down (alert TuneForgeServiceDown)."),
        panel("Build", Target("tuneforge_build_info", "{{job}} {{version}} {{revision}} torch {{torch}}"), kind="stat",
              description="The running build of each service (tuneforge_build_info)."),
    )),
    Row("gRPC APIs (dataprep, trainer, serving admin)", (
        panel("Requests per second", Target("job:tuneforge_grpc_requests:rate5m", "{{job}}"), unit="reqps"),
        panel("Server-error ratio", Target("job:tuneforge_grpc_errors:ratio_rate5m", "{{job}}"), unit="percentunit",
              description="UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS, UNIMPLEMENTED and "
                          "RESOURCE_EXHAUSTED over all calls; a caller's bad argument does not count."),
        panel("Latency p95", Target("job:tuneforge_grpc_request_duration_seconds:p95_5m", "{{job}}"), unit="s",
              description="Streams (ReadShards, WatchJob) count until their last message."),
    )),
    Row("Serving HTTP (OpenAI API)", (
        panel("Requests per second", Target("job:tuneforge_serving_http_requests:rate5m", "{{job}}"), unit="reqps"),
        panel("5xx ratio", Target("job:tuneforge_serving_http_5xx:ratio_rate5m", "{{job}}"), unit="percentunit"),
        panel("Time to first token p95 by model",
              Target("adapter:tuneforge_serving_time_to_first_token_seconds:p95_5m", "{{adapter}}"), unit="s"),
    )),
    Row("Processes", (
        panel("Resident memory", Target(f"process_resident_memory_bytes{{{SERVICES}}}", "{{job}}"), unit="bytes"),
        panel("CPU", Target(f"rate(process_cpu_seconds_total{{{SERVICES}}}[5m])", "{{job}}"), unit="percentunit",
              description="CPU seconds per second (1 = one core busy); training and engine child processes "
                          "are not included."),
    )),
))

DATAPREP = Dashboard("tuneforge-dataprep", "TuneForge / Dataprep",
                     "Preparations (rows, rejects, packing) and shards served to trainers.", (
    Row("Preparation", (
        panel("Rows per second", Target("instance:tuneforge_dataprep_rows_processed:rate5m", "{{instance}}"),
              description="Rows read by preparations, kept or rejected."),
        panel("Rejected rows per second by reason",
              Target("sum by (reason) (rate(tuneforge_dataprep_rows_rejected_total[5m]))", "{{reason}}"),
              description="Each rejected row is a line of the preparation's rejects.jsonl."),
        panel("Rejected share (15 min)", Target("instance:tuneforge_dataprep_rows_rejected:ratio_increase15m",
                                                "{{instance}}"), unit="percentunit"),
        panel("Packing efficiency", Target("tuneforge_dataprep_packing_efficiency_ratio", "{{instance}}"),
              unit="percentunit", description="Real tokens over packed slots of the last packed preparation."),
        panel("Preparations by state", Target("tuneforge_dataprep_preparations_active", "{{state}}")),
        panel("Tokens written per second", Target("rate(tuneforge_dataprep_tokens_total[5m])", "all"),
              Target("rate(tuneforge_dataprep_trained_tokens_total[5m])", "trained")),
    )),
    Row("Serving shards (ReadShards)", (
        panel("Bytes served per second", Target("rate(tuneforge_dataprep_served_bytes_total[5m])", "{{instance}}"),
              unit="Bps"),
        panel("Rows served per second", Target("rate(tuneforge_dataprep_rows_served_total[5m])", "{{instance}}")),
        panel("ReadShards latency",
              *quantiles("tuneforge_dataprep_grpc_request_duration_seconds", selector='{method="ReadShards"}'),
              unit="s", description="Whole stream, first request to last shard."),
        panel("Streams open and limit", Target("sum by (instance) (tuneforge_dataprep_grpc_streams_open)", "open"),
              Target("tuneforge_dataprep_grpc_streams_limit", "limit (--max_streams)")),
        panel("Verified shards in memory", Target("tuneforge_dataprep_shards_in_memory_bytes", "{{instance}}"),
              unit="bytes"),
    )),
))

TRAINER = Dashboard("tuneforge-trainer", "TuneForge / Trainer",
                    "Jobs, their loss and throughput (per job_id, while they run), step time, data wait, "
                    "checkpoints.", (
    Row("Jobs", (
        panel("Jobs by state", Target("tuneforge_trainer_jobs", "{{state}}")),
        panel("Jobs finished (1 h) by state",
              Target("sum by (state) (increase(tuneforge_trainer_jobs_finished_total[1h]))", "{{state}}")),
        panel("Progress", Target("tuneforge_trainer_job_step / tuneforge_trainer_job_total_steps", "{{job_id}}"),
              unit="percentunit"),
        panel("Loss", Target("tuneforge_trainer_loss", "{{job_id}}"),
              Target("tuneforge_trainer_eval_loss", "{{job_id}} eval")),
        panel("Learning rate", Target("tuneforge_trainer_learning_rate", "{{job_id}}")),
        panel("Tokens per second", Target("job_id:tuneforge_trainer_tokens_per_second:avg1m", "{{job_id}}"),
              Target("instance:tuneforge_trainer_tokens:rate5m", "all jobs")),
    )),
    Row("Steps", (
        panel("Step time", *quantiles("tuneforge_trainer_step_duration_seconds"), unit="s"),
        panel("Data wait share of step time", Target("instance:tuneforge_trainer_data_wait:ratio_rate5m",
                                                     "{{instance}}"), unit="percentunit",
              description="Over 10% for 10 minutes: alert TuneForgeTrainingDataWaitHigh."),
        panel("Data wait per step", *quantiles("tuneforge_trainer_data_wait_seconds"), unit="s"),
        panel("Seconds since the last step",
              Target("time() - tuneforge_trainer_job_last_progress_timestamp_seconds", "{{job_id}}"), unit="s",
              description="Over 600 s: alert TuneForgeTrainingJobStalled."),
    )),
    Row("Checkpoints", (
        panel("Checkpoints published per job", Target("tuneforge_trainer_job_checkpoints_published_total",
                                                      "{{job_id}}")),
        panel("Publication time", *quantiles("tuneforge_trainer_checkpoint_publication_duration_seconds"),
              unit="s"),
        panel("Publication failures (1 h)",
              Target("increase(tuneforge_trainer_checkpoint_publication_failures_total[1h])", "{{instance}}")),
    )),
))

SERVING = Dashboard("tuneforge-serving", "TuneForge / Serving",
                    "Requests, errors and latency per model (base or adapter), adapters, and the vLLM engine.", (
    Row("Requests per model", (
        panel("Requests per second", Target("adapter:tuneforge_serving_requests:rate5m", "{{adapter}}"),
              unit="reqps"),
        panel("Errors per second by model and code",
              Target("sum by (adapter, code) (rate(tuneforge_serving_request_errors_total[5m]))",
                     "{{adapter}} {{code}}"), unit="reqps"),
        panel("Time to first token",
              Target("adapter:tuneforge_serving_time_to_first_token_seconds:p50_5m", "p50 {{adapter}}"),
              Target("adapter:tuneforge_serving_time_to_first_token_seconds:p95_5m", "p95 {{adapter}}"),
              Target("adapter:tuneforge_serving_time_to_first_token_seconds:p99_5m", "p99 {{adapter}}"), unit="s",
              description="p95 over 2 s for 10 minutes: alert TuneForgeServingTTFTHigh."),
        panel("Inter-token latency p95",
              Target("adapter:tuneforge_serving_inter_token_latency_seconds:p95_5m", "{{adapter}}"), unit="s"),
        panel("Request latency p95", Target("adapter:tuneforge_serving_request_latency_seconds:p95_5m",
                                            "{{adapter}}"), unit="s"),
        panel("Tokens per second", Target("sum by (adapter) (rate(tuneforge_serving_prompt_tokens_total[5m]))",
                                          "prompt {{adapter}}"),
              Target("sum by (adapter) (rate(tuneforge_serving_generated_tokens_total[5m]))",
                     "generated {{adapter}}")),
    )),
    Row("Admission", (
        panel("In flight, queued and limit", Target("tuneforge_serving_in_flight_requests", "in flight"),
              Target("tuneforge_serving_queue_depth_requests", "waiting for first token"),
              Target("tuneforge_serving_max_in_flight_requests", "limit (--max_concurrent_requests)")),
        panel("HTTP responses per second by code",
              Target("sum by (code) (rate(tuneforge_serving_http_requests_total[5m]))", "{{code}}"), unit="reqps"),
    )),
    Row("Adapters", (
        panel("Adapters ready", Target("tuneforge_serving_adapters_ready", "{{instance}}")),
        panel("Adapter loads (1 h) by result",
              Target("sum by (result) (increase(tuneforge_serving_adapter_loads_total[1h]))", "{{result}}")),
        panel("Adapter load time", *quantiles("tuneforge_serving_adapter_load_duration_seconds"), unit="s"),
    )),
    Row("vLLM engine", (
        panel("Scheduler", Target("tuneforge_serving_engine_running_requests", "running"),
              Target("tuneforge_serving_engine_waiting_requests", "waiting")),
        panel("KV-cache usage", Target("tuneforge_serving_engine_kv_cache_usage_ratio", "{{instance}}"),
              unit="percentunit"),
        panel("Preemptions per second", Target("rate(tuneforge_serving_engine_preemptions_total[5m])",
                                               "{{instance}}"),
              description="Requests whose KV blocks were freed for others (recomputed later): a cache too small."),
        panel("Engine tokens per second", Target("rate(tuneforge_serving_engine_prompt_tokens_total[5m])", "prompt"),
              Target("rate(tuneforge_serving_engine_generation_tokens_total[5m])", "generation")),
        panel("Prefix-cache hit ratio", Target(
            "rate(tuneforge_serving_engine_prefix_cache_hits_total[5m]) "
            "/ rate(tuneforge_serving_engine_prefix_cache_queries_total[5m])", "{{instance}}"), unit="percentunit"),
    )),
))

DASHBOARDS = {"overview": OVERVIEW, "dataprep": DATAPREP, "trainer": TRAINER, "serving": SERVING}


# -- Grafana's JSON ------------------------------------------------------------------------------

def _panel_json(p: Panel, panel_id: int, x: int, y: int) -> dict:
    options = ({"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "textMode": "value_and_name", "colorMode": "background"} if p.kind == "stat" else
               {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"}})
    return {
        "id": panel_id, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend or "__auto", "range": True}
                    for i, t in enumerate(p.targets)],
    }


def render(dashboard: Dashboard) -> dict:
    """Grafana dashboard JSON: a collapsed-free row header per Row, its panels three to a line."""
    panels, y, next_id = [], 0, 1
    for row in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        for i, p in enumerate(row.panels):
            panels.append(_panel_json(p, next_id, (i % 3) * 8, y + (i // 3) * 8))
            next_id += 1
        y += ((len(row.panels) + 2) // 3) * 8
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": ["tuneforge"], "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": True,
        "graphTooltip": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [{"title": "TuneForge", "type": "dashboards", "tags": ["tuneforge"], "asDropdown": True}],
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "panels": panels,
    }


def files() -> dict[str, str]:
    return {f"{name}.json": json.dumps(render(d), indent=2, sort_keys=True) + "\n" for name, d in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.grafana.dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files differ from this module")
    parser.add_argument("--output_dir", default=str(OUT))
    options = parser.parse_args(argv)
    out = pathlib.Path(options.output_dir)
    stale = [name for name, text in files().items()
             if not (out / name).is_file() or (out / name).read_text() != text]
    if options.check:
        for name in stale:
            print(f"{out / name} differs from deploy/grafana/dashboards.py: run python -m deploy.grafana.dashboards",
                  file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files().items():
        (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
