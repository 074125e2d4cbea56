"""`tuneforge serve dataprep|trainer|serving [flags]`: one service in this process."""

from __future__ import annotations

import importlib

from libs.common.errors import InvalidArgument

SERVICES = {
    "dataprep": "services.dataprep.server",
    "trainer": "services.trainer.server",
    "serving": "services.serving.server",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tuneforge serve {dataprep,trainer,serving} [flags]\n"
              "Run `tuneforge serve <service> --help` for a service's flags.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SERVICES:
        raise InvalidArgument(f"expected one of {', '.join(SERVICES)}; got {name!r}", field="service")
    return importlib.import_module(SERVICES[name]).main(rest)
