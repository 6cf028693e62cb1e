"""Logging set-up shared by the daemons: text lines, or JSON objects for log pipelines."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")


def setup_logging(level: str, fmt: str = "text", component: str = "") -> None:
    """One record a line on stderr: ``text`` (journald and kubectl logs add timestamps too), or
    ``json``: an object with ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``component`` and, for an exception, ``exc_info``, for Loki, Elasticsearch or Cloud Logging."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
                static_fields={"component": component} if component else None,
                timestamp="time",
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("grpc").setLevel(logging.WARNING)
