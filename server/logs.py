"""Log set-up of every tokenchat process: text lines for people, JSON lines
for log pipelines (``TOKENCHAT_LOG_FORMAT=json`` or ``--log-format json``).

A JSON line is one object: ``ts`` (RFC 3339, UTC, milliseconds), ``level``,
``logger``, ``pid``, ``msg`` and, when there is one, ``exc`` (the formatted
traceback), so Loki, Elasticsearch or ``jq`` read fields instead of parsing
text. orjson writes it: a record's arguments may be anything, and orjson
falls back to ``str`` for what it cannot encode natively.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import orjson

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


def log_format_from_env() -> LogFormat:
    value = os.environ.get("TOKENCHAT_LOG_FORMAT", "text").strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"TOKENCHAT_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    return "json" if value == "json" else "text"


def configure(level: str, log_format: LogFormat, *, worker: bool = False) -> None:
    """The root logger's one handler, on stderr. ``worker``: a text line
    names the process (a gateway worker among several); JSON lines always do."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        pid = f" [{os.getpid()}]" if worker else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s{pid} %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
