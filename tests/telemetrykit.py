"""Test helpers for access logs, request IDs and tracing: a runtime with a Telemetry, the log
lines read back, and a real OTLP/HTTP receiver (aiohttp on 127.0.0.1) that decodes what it is
sent with opentelemetry-proto."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from httpkit import HOST

from edgelb.control.runtime import EntrypointSpec, Runtime
from edgelb.telemetry.hub import Telemetry
from edgelb.telemetry.settings import (
    AccessLogSettings,
    RequestIdSettings,
    TelemetrySettings,
    TracingSettings,
)
from watchers.model import Address, Policy, Settings, Snapshot


def settings(log: Path | str | None = None, *, fmt: str = "json", sample: float = 1.0,
             buffer: int = 16384, request_id: RequestIdSettings | None = None,
             tracing: TracingSettings | None = None) -> TelemetrySettings:
    access = (AccessLogSettings(enabled=True, format=fmt, path=str(log), sample=sample,
                                buffer=buffer) if log is not None else AccessLogSettings())
    return TelemetrySettings(access_log=access, request_id=request_id or RequestIdSettings(),
                             tracing=tracing or TracingSettings())


@contextlib.asynccontextmanager
async def proxy_with(tel_settings: TelemetrySettings, snap: Snapshot,
                     entrypoints: tuple[tuple[str, int], ...] = ()
                     ) -> AsyncIterator[tuple[Runtime, Telemetry]]:
    """A runtime whose listeners carry a started Telemetry, `snap` applied."""
    runtime = Runtime(loop=asyncio.get_running_loop(), settings=Settings(grace=1.0))
    tel = Telemetry(tel_settings, "test")
    tel.start()
    runtime.telemetry = tel
    if entrypoints:
        await runtime.set_entrypoints(
            [EntrypointSpec(name, Address(HOST, port)) for name, port in entrypoints], Policy())
    await runtime.apply(snap)
    runtime.start_sweeper()
    try:
        yield runtime, tel
    finally:
        await runtime.shutdown(0.2)
        await asyncio.get_running_loop().run_in_executor(None, tel.stop)


async def flush(tel: Telemetry) -> None:
    """Wait (off the loop: a receiver may run on it) until the writer and the exporter have
    handled everything put so far."""
    run = asyncio.get_running_loop().run_in_executor
    if tel.access is not None:
        assert await run(None, tel.access.sink.flush), "the access log writer did not catch up"
    if tel.exporter is not None:
        assert await run(None, tel.exporter.flush), "the span exporter did not catch up"


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint: POST /v1/traces, protobuf, decoded and kept."""

    def __init__(self) -> None:
        self.spans: list = []  # opentelemetry.proto.trace.v1.trace_pb2.Span
        self.resources: list = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.got = asyncio.Event()

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for rs in message.resource_spans:
            self.resources.append(rs.resource)
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        self.got.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"
