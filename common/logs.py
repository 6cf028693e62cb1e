"""Logging set-up shared by the daemons."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """One line per record on stderr (journald and kubectl logs add timestamps too)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)
