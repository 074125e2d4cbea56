"""Shared libraries. Importing any TuneForge package (libs, services, cli) first settles one
piece of process environment, before transformers is imported:

DeepSpeed, which transformers imports whenever it is installed, prints a warning to *stdout*
when it has to guess its accelerator and finds no CUDA device. That corrupts the output of
commands whose stdout is data (e.g. `tuneforge model build-default` prints the model path).
On a machine with no NVIDIA device node the accelerator is named for it: cpu. A value the
user set is kept, and so is auto-detection wherever an NVIDIA device exists."""

import os as _os

if "DS_ACCELERATOR" not in _os.environ and not _os.path.exists("/dev/nvidiactl"):
    _os.environ["DS_ACCELERATOR"] = "cpu"
