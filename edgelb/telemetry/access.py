"""The access log: one record per HTTP request at its end and one per tcp connection, kept on
the loop as a tuple (no formatting there) and written by `sink.LineSink`'s thread, as JSON
(field names: DESIGN.md section 7) or the Apache/nginx combined format.

An HTTP record is HTTP_FIELDS in order; a tcp record is TCP_FIELDS. `upstream_duration_s` is
-1 in a record when no backend answered (null in JSON, "-" in combined).
"""

from __future__ import annotations

import time
from json.encoder import encode_basestring_ascii as _json_str  # type: ignore[attr-defined]
from random import random
from typing import Any

from edgelb.telemetry.settings import AccessLogSettings
from edgelb.telemetry.sink import LineSink

HTTP_FIELDS = ("time", "client_ip", "client_port", "method", "host", "path", "protocol",
               "status", "bytes_received", "bytes_sent", "duration_s", "upstream_duration_s",
               "service", "backend", "retries", "request_id", "trace_id", "reason")
TCP_FIELDS = ("time", "client_ip", "client_port", "protocol", "service", "backend",
              "bytes_received", "bytes_sent", "duration_s", "reason")
MAX_TARGET = 2048  # bytes of a request target kept in a record (a target may be 16 KiB)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class AccessLog:
    """Records in, lines out (on the sink's thread)."""

    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = settings
        self.sample = settings.sample
        self.combined = settings.format == "combined"
        formatter = _Formatter(self.combined)
        self.sink = LineSink(settings.path, formatter.batch, capacity=settings.buffer)

    def keep(self, status: int) -> bool:
        """Sampling: a 5xx (or no status: the client left) is always kept."""
        return self.sample >= 1.0 or status >= 500 or status == 0 or random() < self.sample

    def put(self, record: tuple[Any, ...]) -> None:
        self.sink.put(record)

    @property
    def dropped(self) -> int:
        return self.sink.lost

    def start(self) -> None:
        self.sink.start()

    def stop(self) -> None:
        self.sink.stop()

    def reopen(self) -> None:
        self.sink.reopen()


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


class _Formatter:
    """Turns a batch of records into bytes; caches the time text of the last second."""

    def __init__(self, combined: bool) -> None:
        self.combined = combined
        self._second = -1
        self._stamp = ""

    def batch(self, records: list[tuple[Any, ...]]) -> bytes:
        line = self.combined_line if self.combined else self.json_line
        return "".join([line(r) for r in records]).encode("utf-8", "backslashreplace")

    def _rfc3339(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((t - second) * 1000):03d}Z"

    def json_line(self, r: tuple[Any, ...]) -> str:
        if len(r) == len(TCP_FIELDS):
            t, ip, port, proto, service, backend, n_in, n_out, duration, reason = r
            return (f'{{"time":"{self._rfc3339(t)}","client_ip":{_json_str(ip)},'
                    f'"client_port":{port},"protocol":"{proto}","service":{_json_str(service)},'
                    f'"backend":{_json_str(backend)},"bytes_received":{n_in},'
                    f'"bytes_sent":{n_out},"duration_s":{duration:.6f},'
                    f'"reason":{_json_str(reason)}}}\n')
        (t, ip, port, method, host, target, version, status, n_in, n_out, _body, duration,
         upstream, service, backend, retries, rid, trace, reason, _lines) = r
        path = target.partition(b"?")[0]
        up = "null" if upstream < 0 else f"{upstream:.6f}"
        return (f'{{"time":"{self._rfc3339(t)}","client_ip":{_json_str(_text(ip))},'
                f'"client_port":{port},"method":{_json_str(_text(method))},'
                f'"host":{_json_str(_text(host))},"path":{_json_str(_text(path[:MAX_TARGET]))},'
                f'"protocol":"HTTP/{version}","status":{status},"bytes_received":{n_in},'
                f'"bytes_sent":{n_out},"duration_s":{duration:.6f},"upstream_duration_s":{up},'
                f'"service":{_json_str(service)},"backend":{_json_str(backend)},'
                f'"retries":{retries},"request_id":{_json_str(_text(rid))},'
                f'"trace_id":{_json_str(_text(trace))},"reason":{_json_str(reason)}}}\n')

    def _clf_time(self, t: float) -> str:
        g = time.gmtime(t)
        return (f"{g.tm_mday:02d}/{_MONTHS[g.tm_mon - 1]}/{g.tm_year}:"
                f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} +0000")

    def combined_line(self, r: tuple[Any, ...]) -> str:
        if len(r) == len(TCP_FIELDS):
            t, ip, _port, _proto, service, backend, n_in, n_out, duration, reason = r
            return (f'{ip} - - [{self._clf_time(t)}] "TCP {_clf(service)}" - {n_out} "-" "-" '
                    f'backend={_clf(backend) or "-"} bytes_received={n_in} '
                    f"duration_s={duration:.6f} reason={reason}\n")
        t, ip, method, target, version, status, body, lines = (
            r[0], r[1], r[3], r[5], r[6], r[7], r[10], r[19])
        referer = _header(lines, b"referer:")
        agent = _header(lines, b"user-agent:")
        request = _clf(_text(method + b" " + target[:MAX_TARGET])) + f" HTTP/{version}"
        return (f'{_text(ip)} - - [{self._clf_time(t)}] "{request}" {status} '
                f'{body if body else "-"} "{_clf(referer) or "-"}" "{_clf(agent) or "-"}"\n')


def _header(lines: list[bytes] | None, prefix: bytes) -> str:
    for line in lines or ():
        if line[: len(prefix)].lower() == prefix:
            return _text(line[len(prefix):].strip())
    return ""


def _clf(value: str) -> str:
    """A value inside a combined-format field: quotes, backslashes and controls as \\xHH."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return "".join(c if c.isprintable() and c not in '"\\' else f"\\x{ord(c):02x}"
                   for c in value)
