"""Request IDs and W3C trace context on real sockets, with a real OTLP/HTTP receiver (aiohttp
on 127.0.0.1, decoding with opentelemetry-proto)."""

from __future__ import annotations

import pytest
from httpkit import Client, closed_port, fetch, ok, service, snapshot, within
from telemetrykit import OtlpReceiver, flush, json_lines, proxy_with, settings

from edgelb.net.acl import SourceFilter
from edgelb.telemetry.settings import RequestIdSettings, TracingSettings

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_request_ids_generated_kept_from_trusted_and_replaced_for_others(
        backend, free_port, tmp_path):
    web = await backend("web", ok(b"x"))
    port = free_port()
    trusting = RequestIdSettings(enabled=True, trusted=SourceFilter(["127.0.0.0/8"]))
    async with proxy_with(settings(request_id=trusting),
                          snapshot(service("web", [web], listen=port))):
        generated = await within(fetch(port))
        rid = generated.get("x-request-id")
        assert rid and web.requests[-1].get("x-request-id") == rid
        again = await within(fetch(port))
        assert again.get("x-request-id") not in (None, rid)
        kept = await within(fetch(port, headers=[("X-Request-Id", "abc-123")]))
        assert kept.get("x-request-id") == "abc-123"
        assert web.requests[-1].all("x-request-id") == ["abc-123"]
    port2 = free_port()
    untrusting = RequestIdSettings(enabled=True, trusted=SourceFilter(["10.0.0.0/8"]))
    async with proxy_with(settings(request_id=untrusting),
                          snapshot(service("web", [web], listen=port2))):
        replaced = await within(fetch(port2, headers=[("X-Request-Id", "forged")]))
        new = replaced.get("x-request-id")
        assert new and new != "forged"
        assert web.requests[-1].all("x-request-id") == [new]


async def test_request_ids_off_pass_the_header_through_and_add_nothing(backend, free_port):
    web = await backend("web", ok(b"x"))
    port = free_port()
    async with proxy_with(settings(request_id=RequestIdSettings(enabled=False)),
                          snapshot(service("web", [web], listen=port))):
        plain = await within(fetch(port))
        assert not plain.has("x-request-id") and not web.requests[-1].has("x-request-id")
        given = await within(fetch(port, headers=[("X-Request-Id", "mine")]))
        assert web.requests[-1].all("x-request-id") == ["mine"] and not given.has("x-request-id")


async def test_one_span_per_sampled_request_with_the_clients_trace_id(
        backend, free_port, tmp_path):
    receiver = await OtlpReceiver().start()
    web = await backend("web", ok(b"hello"))
    port = free_port()
    log = tmp_path / "access.log"
    tracing = TracingSettings(otlp_endpoint=receiver.endpoint, sample_ratio=0.0,
                              service_name="edge-test")
    try:
        async with proxy_with(settings(log, tracing=tracing),
                              snapshot(service("web", [web], listen=port))) as (_, tel):
            client = await Client.open(port)
            sampled = await within(client.request("GET", "/s?q", headers=[
                ("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "k=v")]))
            assert sampled.status == 200
            seen = web.requests[-1]
            assert seen.all("tracestate") == ["k=v"]
            version, trace, span, flags = seen.get("traceparent").split("-")
            assert (version, trace, flags) == ("00", TRACE, "01") and span != PARENT
            unsampled = await within(client.request("GET", "/u", headers=[
                ("traceparent", f"00-{'1' * 32}-{PARENT}-00")]))
            assert unsampled.status == 200
            assert web.requests[-1].get("traceparent").endswith("-00")
            started = await within(client.request("GET", "/new"))  # ratio 0: not sampled
            assert started.status == 200
            assert web.requests[-1].get("traceparent").endswith("-00")
            client.close()
            await flush(tel)
        assert len(receiver.spans) == 1
        (s,) = receiver.spans
        assert s.trace_id.hex() == TRACE and s.parent_span_id.hex() == PARENT
        assert s.span_id.hex() == span and s.name == "GET web" and s.kind == 2
        attrs = {a.key: a.value for a in s.attributes}
        assert attrs["http.response.status_code"].int_value == 200
        assert attrs["http.request.method"].string_value == "GET"
        assert attrs["edgelb.service"].string_value == "web"
        assert attrs["edgelb.backend"].string_value == f"127.0.0.1:{web.port}"
        assert attrs["url.path"].string_value == "/s"
        assert attrs["edgelb.upstream_duration_s"].double_value >= 0
        assert s.end_time_unix_nano >= s.start_time_unix_nano > 0
        (resource,) = receiver.resources
        assert {a.key: a.value.string_value for a in resource.attributes} == {
            "service.name": "edge-test"}
        records = json_lines(log)
        assert [r["trace_id"] for r in records][:2] == [TRACE, "1" * 32]
        assert len(records[2]["trace_id"]) == 32
    finally:
        await receiver.stop()


async def test_a_trace_started_here_is_sampled_by_ratio(backend, free_port):
    receiver = await OtlpReceiver().start()
    web = await backend("web", ok(b"x"))
    port = free_port()
    tracing = TracingSettings(otlp_endpoint=receiver.endpoint, sample_ratio=1.0)
    try:
        async with proxy_with(settings(tracing=tracing),
                              snapshot(service("web", [web], listen=port))) as (_, tel):
            for _ in range(3):
                assert (await within(fetch(port))).status == 200
            await flush(tel)
        sent = {r.get("traceparent").split("-")[1] for r in web.requests}
        assert {s.trace_id.hex() for s in receiver.spans} == sent and len(sent) == 3
        assert all(not s.parent_span_id for s in receiver.spans)
    finally:
        await receiver.stop()


async def test_a_collector_that_is_down_costs_clients_nothing(backend, free_port):
    web = await backend("web", ok(b"x"))
    port = free_port()
    tracing = TracingSettings(otlp_endpoint=f"http://127.0.0.1:{closed_port()}",
                              sample_ratio=1.0)
    async with proxy_with(settings(tracing=tracing),
                          snapshot(service("web", [web], listen=port))) as (_, tel):
        client = await Client.open(port)
        for _ in range(50):
            assert (await within(client.request())).status == 200
        client.close()
        await flush(tel)
        assert tel.spans_dropped == 50

