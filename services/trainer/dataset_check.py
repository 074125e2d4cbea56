"""Refuses a job whose datasets hold rows its method does not train on, before any work: the
trainer asks dataprep what each dataset is (DescribeDataset) when the job is submitted."""

from __future__ import annotations

from libs.common.errors import Problems, TuneForgeError, Unavailable
from libs.dataset import client
from services.trainer.config import METHOD_KINDS, TrainConfig


def problems(config: TrainConfig) -> list[str]:
    """One problem per dataset of the wrong kind, naming its kind and what the method needs."""
    kinds, needs = METHOD_KINDS[config.rlhf_type]
    method = f"rlhf_type {config.rlhf_type}" if config.rlhf_type else "supervised training (sft, pt)"
    found = []
    for name in ("dataset", "val_dataset"):
        path = getattr(config, name)
        if not path:
            continue
        try:
            info = client.describe(config.dataprep_address, path)
        except Unavailable as exc:  # the job could not read its data either
            raise Unavailable(exc.message, field="dataprep_address") from None
        except TuneForgeError as exc:  # dataprep's own words, named by this request's field
            raise type(exc)(exc.message.removeprefix("dataset_dir: "), field=name) from None
        if info.task not in kinds:
            found.append(f"{name}: {path} holds {info.task} rows; {method} trains on {needs}")
    return found


def check(config: TrainConfig) -> None:
    found = problems(config)
    if found:
        raise Problems(found)
