"""structlog setup; nobody else configures logging."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ["setup_logging"]

LogFormat = Literal["auto", "json", "console"]


def setup_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """JSON lines on stderr when it is not a terminal (journald, files), colours otherwise."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # third-party libraries (amqtt, paho) log through the standard library: warnings only
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
