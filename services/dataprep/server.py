"""`tuneforge serve dataprep`: the dataprep gRPC service in this process."""

from __future__ import annotations

from libs.common import server
from libs.common.config import parse
from services.dataprep.config import DataprepServerConfig
from services.dataprep.servicer import DataprepServicer, register


def main(argv: list[str]) -> int:
    config = parse(DataprepServerConfig, argv, prog="tuneforge serve dataprep")
    servicer = DataprepServicer(config)
    server.run("dataprep", server.options_of(config), register(servicer),
               on_shutdown=lambda: servicer.shutdown(config.grace_period))
    return 0
