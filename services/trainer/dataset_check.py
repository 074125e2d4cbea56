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
        elif config.rlhf_type == "gkd" and info.packed:
            found.append(f"{name}: {path} was prepared with packing; rlhf_type gkd takes each row's prompt and "
                         f"answer apart: prepare it without --packing")
        elif (name == "dataset" and config.rlhf_type == "gkd" and info.task == "prompt" and config.gkd.lmbda < 1
              and not config.gkd.seq_kd):
            found.append(f"{name}: {path} holds prompt rows without answers; rlhf_type gkd trains on the dataset's "
                         f"answers on a share 1 - lmbda of its steps (lmbda {config.gkd.lmbda}): give conversations "
                         f"with answers (task sft), or --lmbda 1 or --seq_kd true")
        elif name == "dataset" and config.rlhf_type == "kto" and config.kto.loss_type == ["kto"] and info.complete:
            found.extend(_kto_label_problems(config, path))
    return found


def _kto_label_problems(config: TrainConfig, path: str) -> list[str]:
    """KTO weighs desirable against undesirable rows, which must meet in a batch: a dataset
    lacking one kind is refused, naming its balance. Reading stops at the first row of the
    second kind, so a mixed dataset costs a few rows; one lacking a kind is read whole."""
    seen = {True: 0, False: 0}
    for batch, _cursor in client.read_batches(config.dataprep_address, path, max_batch_rows=1024):
        for label in batch.column("label").to_pylist():
            seen[bool(label)] += 1
        if seen[True] and seen[False]:
            return []
    missing = " and ".join(name for name, kind in (("true", True), ("false", False)) if not seen[kind])
    return [f"dataset: {path} holds {seen[True]} desirable and {seen[False]} undesirable rows; rlhf_type kto "
            f"(loss_type kto) needs both kinds in a batch (per_device_train_batch_size "
            f"{config.per_device_train_batch_size}): its loss weighs desirable against undesirable answers "
            f"around a KL baseline; add rows labelled {missing}, or use --loss_type apo_zero_unpaired, which "
            f"has no such need"]


def check(config: TrainConfig) -> None:
    found = problems(config)
    if found:
        raise Problems(found)
