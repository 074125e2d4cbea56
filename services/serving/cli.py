"""`tuneforge deploy [flags]`: serve a base model and LoRA adapters behind an
OpenAI-compatible API (ms-swift's `swift deploy`), in this process."""

from __future__ import annotations

import sys

from libs.common import config as cfg
from services.serving.config import DeployConfig
from services.serving.server import serve


def main(argv: list[str]) -> int:
    return serve(cfg.parse(DeployConfig, argv, prog="tuneforge deploy"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
