"""`tuneforge prepare`: prepare a dataset in this process or through a dataprep service."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

from tqdm import tqdm

from libs.common.config import parse
from libs.dataset import client
from services.dataprep import pipeline
from services.dataprep.config import PrepareCommandConfig, PrepareConfig


def absolute(config: PrepareConfig) -> PrepareConfig:
    """Paths as the user meant them (relative to this shell), for a service whose
    working directory differs; the service and this command share the filesystem."""
    model = str(pathlib.Path(config.model).resolve()) if config.model else None
    return dataclasses.replace(config, model=model, dataset=[str(pathlib.Path(p).resolve()) for p in config.dataset],
                               output_dir=str(pathlib.Path(config.output_dir).resolve()))


def summary(manifest: dict) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in manifest["rejected_by_reason"].items())
    rejected = f"{manifest['rows_rejected']} rejected" + (f" ({reasons})" if reasons else "")
    shards = len(manifest["shards"])
    packed = manifest.get("packing")
    packing = (f", packed into {packed['bins']} rows of {packed['max_length']} tokens "
               f"({packed['efficiency']:.2%} full)" if packed else "")
    return (f"prepared {manifest['rows_in']} rows: {manifest['rows_out']} kept, {rejected}; "
            f"{manifest['tokens']} tokens ({manifest['trained_tokens']} trained){packing} in {shards} "
            f"shard{'s' if shards != 1 else ''} -> {manifest['args']['output_dir']}")


def main(argv: list[str]) -> int:
    command = parse(PrepareCommandConfig, argv, prog="tuneforge prepare")
    config = PrepareConfig(**{f.name: getattr(command, f.name) for f in dataclasses.fields(PrepareConfig)})
    bar: tqdm | None = None  # opened at the first progress report, so an early error prints alone
    reused = False

    def on_progress(progress: pipeline.Progress) -> None:
        nonlocal bar, reused
        if progress.reused:
            reused = True
            return
        if bar is None:
            bar = tqdm(desc="prepare", unit=" rows", file=sys.stderr, dynamic_ncols=True)
        bar.update(progress.rows_in - bar.n)
        bar.set_postfix(kept=progress.rows_out, rejected=progress.rows_rejected, tokens=progress.tokens,
                        shards=progress.shards_written, refresh=False)

    try:
        if command.dataprep_address:
            manifest = client.prepare(command.dataprep_address, absolute(config), on_progress=on_progress)
        else:
            manifest = pipeline.prepare(config, progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    if reused:
        print(f"reused the cached shards in {manifest['args']['output_dir']}: same input files, arguments and "
              f"tokenizer (fingerprint {manifest['fingerprint'][:12]})")
    print(summary(manifest))
    return 0
