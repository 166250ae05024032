"""Spans to an OTLP/HTTP collector, in batches, from a thread of their own.

The loop appends a finished span to a bounded deque (`put`) and goes on; the exporter thread
sends what is there every `interval` (or sooner once a batch is full) as one protobuf POST.
A collector that is slow, refuses or is down costs the loop nothing: the deque fills up to
`capacity`, spans beyond are dropped and counted (`dropped`), and a failed POST drops its batch
(counted in `failed`) after one attempt; the next batch tries again.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections import deque
from urllib.parse import urlsplit

from edgelb.telemetry.otlp import Span, encode_request

log = logging.getLogger("edgelb.telemetry")

BATCH = 512  # spans per POST at most
TIMEOUT = 5.0  # seconds for one POST


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: `endpoint` as given when it has a path, else with
    /v1/traces (as OTEL_EXPORTER_OTLP_ENDPOINT is read)."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


class SpanExporter:
    def __init__(self, endpoint: str, service_name: str, version: str, *,
                 headers: tuple[tuple[str, str], ...] = (), capacity: int = 4096,
                 interval: float = 1.0) -> None:
        self.url = traces_url(endpoint)
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.service_name = service_name
        self.version = version
        self.headers = dict(headers)
        self.capacity = capacity
        self.interval = interval
        self.spans: deque[Span] = deque()
        self.dropped = 0  # by the loop: the deque was full
        self.failed = 0  # by the thread: spans of batches the collector did not take
        self.exported = 0
        self._conn: http.client.HTTPConnection | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""
        self._busy = False

    # -- the loop's side -------------------------------------------------------------------

    def put(self, span: Span) -> None:
        spans = self.spans
        if len(spans) >= self.capacity:
            self.dropped += 1
            return
        spans.append(span)
        if len(spans) == BATCH:
            self._wake.set()

    @property
    def lost(self) -> int:
        return self.dropped + self.failed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgelb span exporter",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every span put so far was sent or counted lost (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.spans or self._busy:
            self._wake.set()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- the exporter thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._busy = True
            try:
                while self.spans:
                    spans = self.spans
                    batch = [spans.popleft() for _ in range(min(len(spans), BATCH))]
                    self._send(batch)
            except Exception:
                log.exception("span exporter: internal error; it goes on")
            finally:
                self._busy = False
            if stopping:
                return

    def _send(self, batch: list[Span]) -> None:
        body = encode_request(batch, self.service_name, self.version)
        headers = {"Content-Type": "application/x-protobuf", **self.headers}
        try:
            conn = self._conn
            if conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                conn = self._conn = cls(self._host, self._port, timeout=TIMEOUT)
            conn.request("POST", self._path, body, headers)
            response = conn.getresponse()
            response.read()
            if response.will_close:
                self._drop_connection()
            if not 200 <= response.status < 300:
                raise OSError(f"answered {response.status} {response.reason}")
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            self.failed += len(batch)
            error = f"{e}" or type(e).__name__
            if error != self._error:
                self._error = error
                log.warning("span exporter: %s: %s; spans are dropped and counted "
                            "(edgelb_tracing_spans_dropped_total) until it works again",
                            self.url, error)
            return
        if self._error:
            log.info("span exporter: %s takes spans again", self.url)
            self._error = ""
        self.exported += len(batch)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
