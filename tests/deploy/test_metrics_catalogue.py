"""docs/operations.md's metrics catalogue names every tuneforge_ metric the services register,
and nothing that no service registers: renaming or adding a metric without the docs fails."""

from __future__ import annotations

import pathlib
import re

from prometheus_client import REGISTRY

from libs.common import metrics
from services.dataprep import metrics as dataprep_metrics  # noqa: F401  registers dataprep's names
from services.serving import metrics as serving_metrics  # noqa: F401
from services.trainer import metrics as trainer_metrics

DOCS = pathlib.Path(__file__).absolute().parents[2] / "docs" / "operations.md"
METHOD = re.compile(r"tuneforge_trainer_(eval_)?(" + "|".join(
    re.escape(name.replace("/", "_")) for name in trainer_metrics.METHOD_METRICS) + ")$")


def exposed_names() -> set[str]:
    for service in ("dataprep", "trainer", "serving"):
        metrics.RpcMetrics(service)
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("tuneforge_"):
            names.add(family.name + {"counter": "_total", "info": "_info"}.get(family.type, ""))
    return names


def catalogue() -> str:
    text = DOCS.read_text()
    return text[text.index("## Metrics catalogue"):text.index("## Alerts and runbooks")]


def test_every_metric_is_in_the_catalogue():
    text = catalogue()
    missing = []
    for name in sorted(exposed_names()):
        if METHOD.match(name):  # the methods' own metrics: one row, `tuneforge_trainer_<metric>`
            assert "tuneforge_trainer_<metric>" in text
            continue
        generic = re.sub(r"^tuneforge_(dataprep|trainer|serving)_grpc_", "tuneforge_<service>_grpc_", name)
        if f"`{name}`" not in text and f"`{generic}`" not in text:
            missing.append(name)
    assert missing == []


def test_the_catalogue_names_no_metric_that_is_not_registered():
    names = exposed_names()
    listed = set(re.findall(r"`(tuneforge_[a-z_]+)`", catalogue()))
    assert sorted(listed - names) == []
