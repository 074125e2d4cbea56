"""TensorBoard event files of a run (OUTPUT_DIR/runs, ms-swift's logging_dir): every logged
number of logging.jsonl as a scalar under train/ (eval/ for eval entries)."""

from __future__ import annotations

import pathlib

LOGGING_DIR = "runs"
# what logging.jsonl carries that is not a curve
NOT_SCALARS = ("step", "total_steps")


class EventWriter:
    """Writes scalars as steps are logged. A resumed run purges the events after its
    checkpoint's step, so the curves show the resumed trajectory, not the killed one's tail."""

    def __init__(self, run_dir: str | pathlib.Path, resumed_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(pathlib.Path(run_dir) / LOGGING_DIR),
                                    purge_step=resumed_step + 1 if resumed_step else None, flush_secs=10)

    def log(self, entry: dict) -> None:
        prefix = "eval" if "eval_loss" in entry else "train"
        for key, value in entry.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, global_step=entry["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
