"""The dashboards against a real Prometheus: Prometheus (the Debian package's binary) scrapes the
session stack's dataprep, trainer and serving every 0.5 s with deploy/prometheus's recording and
alert rules loaded, while a short workload runs (a preparation with a rejected row, a 30-step
LoRA job with evaluation that serving hot-loads, completions on the adapter and the base, one
refused request, a 16-step GRPO job for the online time split). Then every panel's query of every dashboard (deploy/grafana/dashboards.py) runs
through Prometheus's HTTP API over the workload's time range and must return at least one series:
a metric renamed in code, or a rule renamed, fails here. Every rule must evaluate without error,
every metric name the rules and dashboards use must be one a service exposes, and each service's
live page carries its build and process metrics and passes `promtool check metrics`."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import openai
import pytest

from cli import demo
from deploy.grafana import dashboards
from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import client as trainer_client
from services.trainer.config import GrpoConfig, TrainConfig

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).absolute().parents[2]
RULES = ROOT / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def prometheus(stack, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    processes = stack.stack.processes
    targets = {"dataprep": processes["dataprep"].ready["metrics_port"],
               "trainer": processes["trainer"].ready["metrics_port"],
               "serving": processes["serving"].ready["http_port"]}
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(RULES / "recording.rules.yml"), str(RULES / "alerts.rules.yml")],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                           for job, port in targets.items()],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2):
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def workload(stack, tmp_path) -> list[dict]:
    raw = tmp_path / "identity.jsonl"
    demo.write_identity_dataset(raw, "Dash", "Ops")
    with open(raw, "a") as f:
        f.write("not json\n")  # one rejected row
    prepared = tmp_path / "prepared"
    manifest = dataprep_client.prepare(stack.dataprep, PrepareConfig(
        model=str(stack.model_dir), dataset=[str(raw)], output_dir=str(prepared)))
    assert manifest["rows_rejected"] == 1
    job = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        model=str(stack.model_dir), dataset=str(prepared), dataprep_address=stack.dataprep,
        val_dataset=str(prepared), eval_steps=15, output_dir=str(tmp_path / "run"), train_type="lora",
        max_steps=30, save_steps=15, per_device_train_batch_size=2, adapter_name="dash")))
    assert job.error == ""
    client = openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="unused", max_retries=0)
    demo.wait_for_adapter(client, "dash", timeout=60)
    base = client.models.list().data[0].id
    for model in ("dash", base):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "who are you?"}],
                                       max_tokens=8, temperature=0.0)
        for _ in client.completions.create(model=model, prompt="Hello", max_tokens=8, stream=True):
            pass
    with pytest.raises(openai.BadRequestError):  # an error series, counted under its model
        client.completions.create(model="dash", prompt="Hello", max_tokens=10**6)
    return online_job(stack, tmp_path)


def online_job(stack, tmp_path) -> list[dict]:
    """A 16-step GRPO job (transformers generation, 4 tokens a completion, a reward plugin, the
    LoRA-disabled policy as reference): the online time split's per-job series. A step takes
    about 0.15 s here, so 16 of them span a few scrapes (3 steps fell between two). Returns
    its logging.jsonl."""
    started = time.monotonic()
    raw = tmp_path / "prompts.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                           for q in ("who are you?", "What is your name?", "Say hi.", "Who made you?")))
    manifest = dataprep_client.prepare(stack.dataprep, PrepareConfig(
        model=str(stack.model_dir), dataset=[str(raw)], output_dir=str(tmp_path / "prompts"), task="prompt"))
    assert manifest["rows_out"] == 4
    plugin = tmp_path / "length.py"
    plugin.write_text("def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    job = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        model=str(stack.model_dir), dataset=str(tmp_path / "prompts"), dataprep_address=stack.dataprep,
        output_dir=str(tmp_path / "grpo"), rlhf_type="grpo", train_type="lora", max_steps=16,
        per_device_train_batch_size=4, grpo=GrpoConfig(num_generations=2, max_completion_length=4,
                                                       reward_funcs=["length"], external_plugins=[str(plugin)]))))
    assert job.error == ""
    print(f"online job: prepared, trained and published in {time.monotonic() - started:.1f} s")
    return [json.loads(line) for line in (tmp_path / "grpo" / "logging.jsonl").read_text().splitlines()]


def test_every_panel_query_returns_series_from_the_live_stack(stack, prometheus, tmp_path):
    started = time.time()
    online = workload(stack, tmp_path)
    time.sleep(3)  # a few more scrapes and rule evaluations after the last request
    end = time.time()

    empty = []
    for name, dashboard in dashboards.DASHBOARDS.items():
        for title, expr in dashboards.exprs(dashboard):
            result = api(prometheus, "query_range", query=expr, start=started, end=end, step=1)["result"]
            if not result:
                empty.append(f"{name} / {title}: {expr}")
    assert empty == []
    # the online time split: the GRPO job's phases (no sync: its generator is in-process
    # transformers), in seconds per step near the job's own means (measured: generation 0.093 on
    # the panel, 0.101 logged; a rate over 5 minutes divided by a deriv gave 0.001)
    split = dict(dashboards.exprs(dashboards.TRAINER))["Online step time split"]
    series = api(prometheus, "query_range", query=split, start=started, end=end, step=1)["result"]
    assert sorted(s["metric"]["phase"] for s in series) == ["generation", "reference", "reward", "train"]
    assert all(float(v) > 0 for s in series for _t, v in s["values"])
    panel = {s["metric"]["phase"]: float(s["values"][-1][1]) for s in series}
    logged = {phase: sum(e[f"{phase}_seconds"] for e in online) / len(online) for phase in panel}
    print("seconds per step, panel vs logged:", {p: (round(panel[p], 4), round(logged[p], 4)) for p in panel})
    assert all(abs(panel[p] - logged[p]) < 0.5 * logged[p] for p in ("generation", "reference", "train")), panel

    # every service: its build and process metrics, and a page promtool accepts
    builds = api(prometheus, "query", query="tuneforge_build_info")["result"]
    assert sorted(b["metric"]["job"] for b in builds) == ["dataprep", "serving", "trainer"]
    assert all(set(b["metric"]) >= {"version", "revision", "python", "torch"} for b in builds)
    cpu = api(prometheus, "query", query="process_cpu_seconds_total")["result"]
    assert sorted(c["metric"]["job"] for c in cpu) == ["dataprep", "serving", "trainer"]
    promtool = shutil.which("promtool")
    for target in api(prometheus, "targets")["activeTargets"]:
        assert target["health"] == "up", target
        if promtool is not None:
            page = urllib.request.urlopen(target["scrapeUrl"], timeout=10).read()
            lint = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, timeout=30)
            assert lint.returncode == 0, (target["labels"]["job"], lint.stdout + lint.stderr)

    rules = [rule for group in api(prometheus, "rules")["groups"] for rule in group["rules"]]
    assert (sum(r["type"] == "recording" for r in rules), sum(r["type"] == "alerting" for r in rules)) == (19, 10)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    # every tuneforge_ metric the rules and dashboards name is one a service exposes (HELP/TYPE
    # lines count: a per-job gauge between jobs has no sample but is still declared)
    exposed = set(api(prometheus, "metadata"))
    # (not a recording rule's middle part, level:tuneforge_...:operation)
    used = set(re.findall(r"(?<![:\w])tuneforge_[a-z_]+(?![:\w])", (RULES / "recording.rules.yml").read_text()
                          + (RULES / "alerts.rules.yml").read_text()
                          + json.dumps([expr for d in dashboards.DASHBOARDS.values()
                                        for _title, expr in dashboards.exprs(d)])))
    used -= {"tuneforge_"}  # the gRPC rules' name regex

    def declared(metric: str) -> bool:
        return metric in exposed or re.sub(r"_(bucket|sum|count|total)$", "", metric) in exposed

    assert sorted(m for m in used if not declared(m)) == []
