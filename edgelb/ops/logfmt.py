"""The process log: text (the default) or one JSON object per line (`--log-format json`, or
EDGELB_LOG_FORMAT=json), at --log-level or EDGELB_LOG_LEVEL. The flags win over the
environment. (The access log is another stream: edgelb/telemetry/access.py.)"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time": RFC 3339 UTC, "level", "logger", "message"[, "exception"]}"""

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
            + f".{int((t - int(t)) * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def resolve(level: str | None, fmt: str | None) -> tuple[str, str, list[str]]:
    """(level, format, problems): the flags, else the environment, else info and text. A bad
    environment value is a problem (said once the log is set up), not a failure."""
    problems = []
    env_level = os.environ.get("EDGELB_LOG_LEVEL", "").strip().lower()
    env_fmt = os.environ.get("EDGELB_LOG_FORMAT", "").strip().lower()
    if env_level and env_level not in LEVELS:
        problems.append(f"EDGELB_LOG_LEVEL={env_level!r} is not one of {', '.join(LEVELS)}; "
                        "using info")
        env_level = ""
    if env_fmt and env_fmt not in FORMATS:
        problems.append(f"EDGELB_LOG_FORMAT={env_fmt!r} is not text or json; using text")
        env_fmt = ""
    return level or env_level or "info", fmt or env_fmt or "text", problems


def configure(level: str | None, fmt: str | None) -> None:
    """Set up the root logger on stderr."""
    level, fmt, problems = resolve(level, fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for problem in problems:
        logging.getLogger("edgelb").warning("%s", problem)
