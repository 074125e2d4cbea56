"""Every training method on the seam declares what the engine and the service rely on: the
dataset kinds config.METHOD_KINDS gives its --rlhf_type (what SubmitJob checks), and only
metric names that have a Prometheus gauge (a name without one would be logged to
logging.jsonl yet silently missing from /metrics)."""

from __future__ import annotations

import pytest

from services.trainer import config, methods, metrics


def test_every_rlhf_type_has_a_method_and_kinds():
    assert set(methods.MODULES) == set(config.METHOD_KINDS)


@pytest.mark.parametrize("rlhf_type", list(methods.MODULES), ids=lambda t: t or "sft")
def test_a_method_declares_its_kinds_and_gauged_metrics(rlhf_type):
    method = methods.get(rlhf_type)
    assert (method.kinds, method.needs) == config.METHOD_KINDS[rlhf_type]
    assert method.name == (rlhf_type or "sft")
    assert set(method.metrics) <= set(metrics.METHOD_METRICS), set(method.metrics) - set(metrics.METHOD_METRICS)
    assert len(set(method.metrics)) == len(method.metrics)  # each summed once per step
