"""The access log on real sockets: one record per request for a mix of outcomes, with the
fields of DESIGN.md section 7; a logrotate-style move loses no line; a sink that blocks does not
slow traffic and counts what it drops; the combined format; sampling."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import pytest
from httpkit import (
    Client,
    closed_port,
    eventually,
    fetch,
    ok,
    service,
    snapshot,
    tcp_echo_server,
    upgrade_echo,
    within,
)
from telemetrykit import flush, json_lines, proxy_with, settings

from edgelb.net.acl import parse_auth
from edgelb.ops.metrics import make_registry
from edgelb.telemetry.access import HTTP_FIELDS, TCP_FIELDS

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

PASSWORD_USER = "alice:$apr1$AaocIc/q$FvHse91XUyk4rVL9m4nyQ0"  # htpasswd -nbm, 'Hello world!'


def _creds() -> Any:
    c, errors = parse_auth({"realm": "shop", "users": [PASSWORD_USER]}, "auth")
    assert not errors
    return c


async def test_one_record_per_request_for_a_mix_of_outcomes(backend, free_port, tmp_path):
    log = tmp_path / "access.log"
    web = await backend("web", ok(b"hello"))
    ws = await backend("ws", upgrade_echo())
    echo, echo_port = await tcp_echo_server()
    p = {k: free_port() for k in ("web", "shed", "auth", "bad", "ws", "tcp", "ep")}
    snap = snapshot(
        service("web", [web], listen=p["web"]),
        service("empty", [], listen=p["shed"]),
        service("locked", [web], listen=p["auth"], auth=_creds()),
        service("broken", [closed_port()], listen=p["bad"], retries=0),
        service("ws", [ws], listen=p["ws"]),
        service("raw", [echo_port], listen=p["tcp"], mode="tcp"),
    )
    try:
        async with proxy_with(settings(log), snap, entrypoints=(("ep", p["ep"]),)) as (_, tel):
            assert (await within(fetch(p["web"], "POST", "/a/b?q=1", body=b"12345"))).status == 200
            assert (await within(fetch(p["shed"]))).status == 503
            assert (await within(fetch(p["ep"], "GET", "/nowhere"))).status == 404
            assert (await within(fetch(p["auth"]))).status == 401
            assert (await within(fetch(p["bad"]))).status == 502
            client = await Client.open(p["ws"])
            await client.send(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
                              b"Upgrade: echo\r\n\r\n")
            head = await within(client.read_head())
            assert head.status == 101
            await client.send(b"ping")
            assert await within(client.reader.readexactly(4)) == b"ping"
            client.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", p["tcp"])
            writer.write(b"abc")
            assert await within(reader.readexactly(3)) == b"abc"
            writer.close()
            sink = tel.access.sink  # type: ignore[union-attr]
            await eventually(lambda: sink.written + len(sink.pending) >= 7, what="7 records")
            await flush(tel)
    finally:
        echo.close()
    records = json_lines(log)
    assert len(records) == 7, records
    http = [r for r in records if r["protocol"] != "tcp"]
    for r in http:
        assert list(r) == list(HTTP_FIELDS)
    by = {(r["service"], r["status"]): r for r in http}
    proxied = by[("web", 200)]
    assert proxied["method"] == "POST" and proxied["path"] == "/a/b"
    assert proxied["bytes_received"] == 5 and proxied["bytes_sent"] > 5
    assert proxied["reason"] == "" and proxied["backend"] == f"127.0.0.1:{web.port}"
    assert proxied["upstream_duration_s"] >= 0 and proxied["duration_s"] >= 0
    assert proxied["client_ip"] == "127.0.0.1" and proxied["client_port"] > 0
    assert proxied["protocol"] == "HTTP/1.1" and proxied["host"] == "test.local"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", proxied["time"])
    assert proxied["request_id"]  # request IDs are on with the access log
    assert by[("empty", 503)]["reason"] == "shed"
    assert by[("", 404)]["reason"] == "no_route"
    assert by[("locked", 401)]["reason"] == "auth"
    bad = by[("broken", 502)]
    assert bad["reason"] == "upstream_error" and bad["backend"]
    upgraded = by[("ws", 101)]
    assert upgraded["reason"] == "upgraded" and upgraded["bytes_received"] >= 4
    assert upgraded["upstream_duration_s"] >= 0
    (tcp,) = [r for r in records if r["protocol"] == "tcp"]
    assert list(tcp) == list(TCP_FIELDS)
    assert tcp["service"] == "raw" and tcp["bytes_received"] == 3 and tcp["bytes_sent"] == 3
    assert tcp["backend"] == f"127.0.0.1:{echo_port}" and tcp["reason"] == "closed"


async def test_a_logrotate_move_loses_no_line(backend, free_port, tmp_path):
    log = tmp_path / "access.log"
    web = await backend("web", ok(b"x"))
    port = free_port()
    async with proxy_with(settings(log), snapshot(service("web", [web], listen=port))) as (_, tel):
        client = await Client.open(port)
        for _ in range(20):
            assert (await within(client.request())).status == 200
        await flush(tel)
        os.rename(log, tmp_path / "access.log.1")  # logrotate's move; the writer still has it
        for _ in range(20):
            assert (await within(client.request())).status == 200
        tel.reopen()  # SIGUSR1, as logrotate's postrotate sends it
        await eventually(lambda: log.exists(), what="the new file")
        for _ in range(20):
            assert (await within(client.request())).status == 200
        # and without a signal: moved again, the inode check reopens within a second or so
        await flush(tel)
        os.rename(log, tmp_path / "access.log.2")
        await eventually(lambda: log.exists(), timeout=5.0, what="the file reopened")
        for _ in range(10):
            assert (await within(client.request())).status == 200
        client.close()
        await flush(tel)
    counts = [len(json_lines(tmp_path / n)) for n in ("access.log.1", "access.log.2",
                                                     "access.log")]
    # each line is in the file that was open when it was written: the moved ones, or the new
    assert sum(counts) == 70 and counts[0] >= 20 and counts[2] >= 10, counts
    assert tel.log_dropped == 0


async def test_a_sink_that_blocks_drops_lines_and_does_not_stall_traffic(backend, free_port,
                                                                        tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    web = await backend("web", ok(b"x"))
    port = free_port()
    try:
        async with proxy_with(settings(fifo, buffer=100),
                              snapshot(service("web", [web], listen=port))) as (rt, tel):
            client = await Client.open(port)
            t0 = time.monotonic()
            for _ in range(1500):  # far more than the pipe (64 KiB) and the buffer hold
                assert (await within(client.request())).status == 200
            elapsed = time.monotonic() - t0
            client.close()
            await eventually(lambda: tel.log_dropped > 0, what="dropped lines")
            registry = make_registry(rt, process=False)
            assert registry.get_sample_value("edgelb_access_log_dropped_total") == tel.log_dropped
            assert elapsed < 10.0
            assert tel.access is not None and len(tel.access.sink.pending) <= 100
    finally:
        os.close(reader)  # the writer's blocked write fails (EPIPE) and it can stop


async def test_combined_format(backend, free_port, tmp_path):
    log = tmp_path / "access.log"
    web = await backend("web", ok(b"hello"))
    port = free_port()
    async with proxy_with(settings(log, fmt="combined"),
                          snapshot(service("web", [web], listen=port))) as (_, tel):
        resp = await within(fetch(port, "GET", "/p?x=1", headers=[
            ("Referer", "http://a/"), ("User-Agent", 'curl "8"')]))
        assert resp.status == 200
        await flush(tel)
    (line,) = log.read_text().splitlines()
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /p\?x=1 HTTP/1\.1" '
        r'200 5 "http://a/" "curl \\x228\\x22"', line), line


async def test_sampling_keeps_its_share_and_every_5xx(backend, free_port, tmp_path):
    log = tmp_path / "access.log"
    web = await backend("web", ok(b"x"))
    port, shed = free_port(), free_port()
    snap = snapshot(service("web", [web], listen=port), service("empty", [], listen=shed))
    async with proxy_with(settings(log, sample=0.0), snap) as (_, tel):
        client = await Client.open(port)
        for _ in range(50):
            assert (await within(client.request())).status == 200
        client.close()
        for _ in range(3):
            assert (await within(fetch(shed))).status == 503
        await flush(tel)
    records = json_lines(log)
    assert [r["status"] for r in records] == [503, 503, 503]


async def test_an_http2_stream_is_logged_as_http2_with_the_clients_port(backend, free_port,
                                                                         tmp_path):
    from h2kit import H2Client

    from watchers.model import Address, Backend, Service

    log = tmp_path / "access.log"
    web = await backend("web", ok(b"hello"))
    port = free_port()
    snap = snapshot(Service(name="web", listen=Address("127.0.0.1", port), h2c=True,
                            backends=(Backend("127.0.0.1", web.port),)))
    async with proxy_with(settings(log), snap) as (_, tel):
        client = H2Client()
        await client.connect(port)
        try:
            r = await client.get("/h2?x=1")
            assert r.status == 200
            local_port = client.writer.get_extra_info("sockname")[1]
        finally:
            await client.close()
        await flush(tel)
    (record,) = json_lines(log)
    assert record["protocol"] == "HTTP/2.0"
    assert record["path"] == "/h2" and record["status"] == 200 and record["service"] == "web"
    assert record["client_port"] == local_port
