"""TuneForge's Grafana dashboards as code, built with grafana-foundation-sdk (Grafana's own
dashboards-as-code SDK, the Grafana 10.1 schema): one overview across the three services and one
per service, each panel a PromQL query over the metrics the services export and the recording
rules in deploy/prometheus. `python -m deploy.grafana.dashboards` writes them to
deploy/grafana/dashboards/*.json (provisioned by deploy/grafana/provisioning); `--check` exits 1
when the files differ from this module."""

from __future__ import annotations

import argparse
import pathlib
import sys

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models

OUT = pathlib.Path(__file__).resolve().parent / "dashboards"
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
SERVICES = 'job=~"dataprep|trainer|serving"'
WIDTH, HEIGHT = 8, 8  # three panels to a line of Grafana's 24-column grid


def query(expr: str, legend: str = "") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").range().datasource(DATASOURCE)


def panel(title: str, *targets: prometheus.Dataquery | str, unit: str = "short", description: str = "",
          kind: str = "timeseries") -> timeseries.Panel | stat.Panel:
    """A time series (or stat) panel of one or more queries, refIds A, B, ... in order."""
    if kind == "stat":
        builder = (stat.Panel().text_mode(common.BigValueTextMode.VALUE_AND_NAME)
                   .color_mode(common.BigValueColorMode.BACKGROUND)
                   .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    else:
        builder = (timeseries.Panel()
                   .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                           .placement(common.LegendPlacement.BOTTOM).show_legend(True))
                   .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                            .sort(common.SortOrder.DESCENDING)))
    builder.title(title).description(description).unit(unit).datasource(DATASOURCE).span(WIDTH).height(HEIGHT)
    for i, target in enumerate(targets):
        builder.with_target((query(target) if isinstance(target, str) else target).ref_id(chr(ord("A") + i)))
    return builder


def row(title: str, panels: tuple) -> tuple[str, tuple]:
    return title, panels


def dashboard(uid: str, title: str, description: str, rows: tuple[tuple[str, tuple], ...]) -> models.Dashboard:
    """A dashboard of rows (never collapsed), each row's panels three to a line; the SDK lays out
    the grid, panel ids count up from 1 in order."""
    builder = (dashboard_builders.Dashboard(title).uid(uid).description(description).tags(["tuneforge"])
               .timezone("utc").editable().tooltip(models.DashboardCursorSync.CROSSHAIR).refresh("30s")
               .time("now-6h", "now").version(1)
               .link(dashboard_builders.DashboardLink("TuneForge").type(models.DashboardLinkType.DASHBOARDS)
                     .tags(["tuneforge"]).as_dropdown(True))
               .with_variable(dashboard_builders.DatasourceVariable("datasource").label("Prometheus")
                              .type("prometheus")))
    panel_id = 1
    for row_title, row_panels in rows:
        builder.with_row(dashboard_builders.Row(row_title).collapsed(False).id(panel_id))
        panel_id += 1
        for p in row_panels:
            builder.with_panel(p.id(panel_id))
            panel_id += 1
    return builder.build()


def panels(board: models.Dashboard) -> list[models.Panel]:
    """The dashboard's query panels (not its row headers)."""
    return [p for p in board.panels if not isinstance(p, models.RowPanel)]


def exprs(board: models.Dashboard) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    return [(p.title, t.expr) for p in panels(board) for t in p.targets]


# -- the dashboards ----------------------------------------------------------------------------

def quantiles(metric: str, by: str = "", selector: str = "") -> tuple[prometheus.Dataquery, ...]:
    """p50 and p95 of a histogram over 5 minutes, per `by` label (none: all series together)."""
    return tuple(query(f"histogram_quantile({q}, sum by ({by + ', ' if by else ''}le) "
                       f"(rate({metric}_bucket{selector}[5m])))",
                       f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))
                 for q in (0.5, 0.95))


OVERVIEW = dashboard("tuneforge-overview", "TuneForge / Overview",
                     "Health and RED (rate, errors, duration) of dataprep, trainer and serving.", (
    row("Health", (
        panel("Targets up", query(f"up{{{SERVICES}}}", "{{job}} {{instance}}"), kind="stat",
              description="1: Prometheus scraped the service's /metrics; 0: down (alert TuneForgeServiceDown)."),
        panel("Build", query("tuneforge_build_info", "{{job}} {{version}} {{revision}} torch {{torch}}"), kind="stat",
              description="The running build of each service (tuneforge_build_info)."),
    )),
    row("gRPC APIs (dataprep, trainer, serving admin)", (
        panel("Requests per second", query("job:tuneforge_grpc_requests:rate5m", "{{job}}"), unit="reqps"),
        panel("Server-error ratio", query("job:tuneforge_grpc_errors:ratio_rate5m", "{{job}}"), unit="percentunit",
              description="UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS, UNIMPLEMENTED and "
                          "RESOURCE_EXHAUSTED over all calls; a caller's bad argument does not count."),
        panel("Latency p95", query("job:tuneforge_grpc_request_duration_seconds:p95_5m", "{{job}}"), unit="s",
              description="Streams (ReadShards, WatchJob) count until their last message."),
    )),
    row("Serving HTTP (OpenAI API)", (
        panel("Requests per second", query("job:tuneforge_serving_http_requests:rate5m", "{{job}}"), unit="reqps"),
        panel("5xx ratio", query("job:tuneforge_serving_http_5xx:ratio_rate5m", "{{job}}"), unit="percentunit"),
        panel("Time to first token p95 by model",
              query("adapter:tuneforge_serving_time_to_first_token_seconds:p95_5m", "{{adapter}}"), unit="s"),
    )),
    row("Processes", (
        panel("Resident memory", query(f"process_resident_memory_bytes{{{SERVICES}}}", "{{job}}"), unit="bytes"),
        panel("CPU", query(f"rate(process_cpu_seconds_total{{{SERVICES}}}[5m])", "{{job}}"), unit="percentunit",
              description="CPU seconds per second (1 = one core busy); training and engine child processes "
                          "are not included."),
    )),
))

DATAPREP = dashboard("tuneforge-dataprep", "TuneForge / Dataprep",
                     "Preparations (rows, rejects, packing) and shards served to trainers.", (
    row("Preparation", (
        panel("Rows per second", query("instance:tuneforge_dataprep_rows_processed:rate5m", "{{instance}}"),
              description="Rows read by preparations, kept or rejected."),
        panel("Rejected rows per second by reason",
              query("sum by (reason) (rate(tuneforge_dataprep_rows_rejected_total[5m]))", "{{reason}}"),
              description="Each rejected row is a line of the preparation's rejects.jsonl."),
        panel("Rejected share (15 min)", query("instance:tuneforge_dataprep_rows_rejected:ratio_increase15m",
                                               "{{instance}}"), unit="percentunit"),
        panel("Packing efficiency", query("tuneforge_dataprep_packing_efficiency_ratio", "{{instance}}"),
              unit="percentunit", description="Real tokens over packed slots of the last packed preparation."),
        panel("Preparations by state", query("tuneforge_dataprep_preparations_active", "{{state}}")),
        panel("Tokens written per second", query("rate(tuneforge_dataprep_tokens_total[5m])", "all"),
              query("rate(tuneforge_dataprep_trained_tokens_total[5m])", "trained")),
    )),
    row("Serving shards (ReadShards)", (
        panel("Bytes served per second", query("rate(tuneforge_dataprep_served_bytes_total[5m])", "{{instance}}"),
              unit="Bps"),
        panel("Rows served per second", query("rate(tuneforge_dataprep_rows_served_total[5m])", "{{instance}}")),
        panel("ReadShards latency",
              *quantiles("tuneforge_dataprep_grpc_request_duration_seconds", selector='{method="ReadShards"}'),
              unit="s", description="Whole stream, first request to last shard."),
        panel("Streams open and limit", query("sum by (instance) (tuneforge_dataprep_grpc_streams_open)", "open"),
              query("tuneforge_dataprep_grpc_streams_limit", "limit (--max_streams)")),
        panel("Verified shards in memory", query("tuneforge_dataprep_shards_in_memory_bytes", "{{instance}}"),
              unit="bytes"),
    )),
))

TRAINER = dashboard("tuneforge-trainer", "TuneForge / Trainer",
                    "Jobs, their loss and throughput (per job_id, while they run), step time, data wait, "
                    "checkpoints.", (
    row("Jobs", (
        panel("Jobs by state", query("tuneforge_trainer_jobs", "{{state}}")),
        panel("Jobs finished (1 h) by state",
              query("sum by (state) (increase(tuneforge_trainer_jobs_finished_total[1h]))", "{{state}}")),
        panel("Progress", query("tuneforge_trainer_job_step / tuneforge_trainer_job_total_steps", "{{job_id}}"),
              unit="percentunit"),
        panel("Loss", query("tuneforge_trainer_loss", "{{job_id}}"),
              query("tuneforge_trainer_eval_loss", "{{job_id}} eval")),
        panel("Learning rate", query("tuneforge_trainer_learning_rate", "{{job_id}}")),
        panel("Tokens per second", query("job_id:tuneforge_trainer_tokens_per_second:avg1m", "{{job_id}}"),
              query("instance:tuneforge_trainer_tokens:rate5m", "all jobs")),
    )),
    row("Steps", (
        panel("Step time", *quantiles("tuneforge_trainer_step_duration_seconds"), unit="s"),
        panel("Data wait share of step time", query("instance:tuneforge_trainer_data_wait:ratio_rate5m",
                                                    "{{instance}}"), unit="percentunit",
              description="Over 10% for 10 minutes: alert TuneForgeTrainingDataWaitHigh."),
        panel("Data wait per step", *quantiles("tuneforge_trainer_data_wait_seconds"), unit="s"),
        panel("Seconds since the last step",
              query("time() - tuneforge_trainer_job_last_progress_timestamp_seconds", "{{job_id}}"), unit="s",
              description="Over 600 s: alert TuneForgeTrainingJobStalled."),
        panel("Online step time split",
              query("sum by (job_id, phase) (increase(tuneforge_trainer_job_phase_seconds_total[5m])) "
                    "/ on (job_id) group_left () delta(tuneforge_trainer_job_step[5m])", "{{job_id}} {{phase}}"),
              unit="s", description="Seconds per optimizer step an online job (grpo, ppo, gkd, ...) spends "
                                    "generating, scoring rewards, in the reference model, syncing weights to its "
                                    "generator and training over the last 5 minutes (none while it takes no step): the "
                                    "largest is where to look first."),
    )),
    row("Checkpoints", (
        panel("Checkpoints published per job", query("tuneforge_trainer_job_checkpoints_published_total",
                                                     "{{job_id}}")),
        panel("Publication time", *quantiles("tuneforge_trainer_checkpoint_publication_duration_seconds"),
              unit="s"),
        panel("Publication failures (1 h)",
              query("increase(tuneforge_trainer_checkpoint_publication_failures_total[1h])", "{{instance}}")),
    )),
))

SERVING = dashboard("tuneforge-serving", "TuneForge / Serving",
                    "Requests, errors and latency per model (base or adapter), adapters, and the vLLM engine.", (
    row("Requests per model", (
        panel("Requests per second", query("adapter:tuneforge_serving_requests:rate5m", "{{adapter}}"),
              unit="reqps"),
        panel("Errors per second by model and code",
              query("sum by (adapter, code) (rate(tuneforge_serving_request_errors_total[5m]))",
                    "{{adapter}} {{code}}"), unit="reqps"),
        panel("Time to first token",
              query("adapter:tuneforge_serving_time_to_first_token_seconds:p50_5m", "p50 {{adapter}}"),
              query("adapter:tuneforge_serving_time_to_first_token_seconds:p95_5m", "p95 {{adapter}}"),
              query("adapter:tuneforge_serving_time_to_first_token_seconds:p99_5m", "p99 {{adapter}}"), unit="s",
              description="p95 over 2 s for 10 minutes: alert TuneForgeServingTTFTHigh."),
        panel("Inter-token latency p95",
              query("adapter:tuneforge_serving_inter_token_latency_seconds:p95_5m", "{{adapter}}"), unit="s"),
        panel("Request latency p95", query("adapter:tuneforge_serving_request_latency_seconds:p95_5m",
                                           "{{adapter}}"), unit="s"),
        panel("Tokens per second", query("sum by (adapter) (rate(tuneforge_serving_prompt_tokens_total[5m]))",
                                         "prompt {{adapter}}"),
              query("sum by (adapter) (rate(tuneforge_serving_generated_tokens_total[5m]))",
                    "generated {{adapter}}")),
    )),
    row("Admission", (
        panel("In flight, queued and limit", query("tuneforge_serving_in_flight_requests", "in flight"),
              query("tuneforge_serving_queue_depth_requests", "waiting for first token"),
              query("tuneforge_serving_max_in_flight_requests", "limit (--max_concurrent_requests)")),
        panel("HTTP responses per second by code",
              query("sum by (code) (rate(tuneforge_serving_http_requests_total[5m]))", "{{code}}"), unit="reqps"),
    )),
    row("Adapters", (
        panel("Adapters ready", query("tuneforge_serving_adapters_ready", "{{instance}}")),
        panel("Adapter loads (1 h) by result",
              query("sum by (result) (increase(tuneforge_serving_adapter_loads_total[1h]))", "{{result}}")),
        panel("Adapter load time", *quantiles("tuneforge_serving_adapter_load_duration_seconds"), unit="s"),
        panel("Hot-load time by part (mean, 1 h)",
              query("sum by (part) (increase(tuneforge_serving_adapter_load_part_seconds_sum[1h])) "
                    "/ sum by (part) (increase(tuneforge_serving_adapter_load_part_seconds_count[1h]))", "{{part}}"),
              unit="s", description="A publication's way to traffic: delivery (trainer's publication -> load "
              "starts), verification, registration (vLLM add_lora), first_request. Which part grew: "
              "docs/serving.md, Hot-loading."),
    )),
    row("vLLM engine", (
        panel("Scheduler", query("tuneforge_serving_engine_running_requests", "running"),
              query("tuneforge_serving_engine_waiting_requests", "waiting")),
        panel("KV-cache usage", query("tuneforge_serving_engine_kv_cache_usage_ratio", "{{instance}}"),
              unit="percentunit"),
        panel("Preemptions per second", query("rate(tuneforge_serving_engine_preemptions_total[5m])",
                                              "{{instance}}"),
              description="Requests whose KV blocks were freed for others (recomputed later): a cache too small."),
        panel("Engine tokens per second", query("rate(tuneforge_serving_engine_prompt_tokens_total[5m])", "prompt"),
              query("rate(tuneforge_serving_engine_generation_tokens_total[5m])", "generation")),
        panel("Prefix-cache hit ratio", query(
            "rate(tuneforge_serving_engine_prefix_cache_hits_total[5m]) "
            "/ rate(tuneforge_serving_engine_prefix_cache_queries_total[5m])", "{{instance}}"), unit="percentunit"),
    )),
))

DASHBOARDS = {"overview": OVERVIEW, "dataprep": DATAPREP, "trainer": TRAINER, "serving": SERVING}


def files() -> dict[str, str]:
    encoder = JSONEncoder(sort_keys=True, indent=2)
    return {f"{name}.json": encoder.encode(board) + "\n" for name, board in DASHBOARDS.items()}


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
