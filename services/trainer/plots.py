"""The run directory's loss curves as PNG images (matplotlib, Agg: no display needed):
OUTPUT_DIR/images/train_loss.png, and eval_loss.png once eval has run, as ms-swift writes."""

from __future__ import annotations

import os
import pathlib

IMAGES = "images"


def _plot(path: pathlib.Path, steps: list[int], values: list[float], title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global state across threads

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, values, marker="." if len(steps) < 50 else None)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)  # a reader never sees half an image
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temporary file


def write_loss_curves(run_dir: str | pathlib.Path, logged: list[dict]) -> list[pathlib.Path]:
    """Plots `loss` and `eval_loss` of the logged entries against their step; returns the
    images written (none while nothing is logged)."""
    directory = pathlib.Path(run_dir) / IMAGES
    written = []
    for key, name, title in (("loss", "train_loss.png", "training loss"), ("eval_loss", "eval_loss.png", "eval loss")):
        points = [(e["step"], e[key]) for e in logged if key in e]
        if not points:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        steps, values = zip(*points)
        _plot(directory / name, list(steps), list(values), title, key)
        written.append(directory / name)
    return written
