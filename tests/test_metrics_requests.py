"""edgelb_requests_total by method and status class (upgrades and edgelb's own answers
included), the duration histogram's labels and the size histograms, scraped from /metrics of a
running edgelb; `promtool check metrics` passes on the scrape."""

from __future__ import annotations

import shutil
import subprocess

import aiohttp
import pytest
from httpkit import Client, fetch, ok, running, service, snapshot, upgrade_echo, within
from prometheus_client.parser import text_string_to_metric_families

from edgelb.ops.admin import AdminServer
from watchers.model import Address

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


async def test_requests_by_method_and_class_and_size_histograms_on_metrics(backend, free_port):
    web = await backend("web", ok(b"x" * 300))
    ws = await backend("ws", upgrade_echo())
    pw, pws, pshed = free_port(), free_port(), free_port()
    snap = snapshot(service("web", [web], listen=pw), service("ws", [ws], listen=pws),
                    service("empty", [], listen=pshed))
    async with running(snap) as rt:
        admin = AdminServer(rt, Address("127.0.0.1", 0))
        await admin.start()
        try:
            assert (await within(fetch(pw))).status == 200
            assert (await within(fetch(pw, "POST", "/", body=b"y" * 1000))).status == 200
            assert (await within(fetch(pw, "PROPFIND", "/"))).status == 200
            assert (await within(fetch(pshed, "DELETE", "/"))).status == 503
            client = await Client.open(pws)
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
                              b"Upgrade: echo\r\n\r\n")
            assert (await within(client.read_head())).status == 101
            async with aiohttp.ClientSession() as session, session.get(
                    f"{admin.url}/metrics") as resp:
                text = await resp.text()
            client.close()
        finally:
            await admin.stop()
    requests = {(lb["service"], lb["backend"] != "", lb["code"], lb["method"],
                 lb["code_class"]): v for lb, v in _samples(text, "edgelb_requests_total")}
    assert requests[("web", True, "200", "GET", "2xx")] == 1
    assert requests[("web", True, "200", "POST", "2xx")] == 1
    assert requests[("web", True, "200", "OTHER", "2xx")] == 1
    assert requests[("empty", False, "503", "DELETE", "5xx")] == 1
    assert requests[("ws", True, "101", "GET", "1xx")] == 1  # an upgrade is counted
    counts = {(lb["service"], lb["method"], lb["code_class"]): v
              for lb, v in _samples(text, "edgelb_request_duration_seconds_count")}
    assert counts[("web", "GET", "2xx")] == 1 and counts[("ws", "GET", "1xx")] == 1
    assert counts[("empty", "DELETE", "5xx")] == 1
    req_sum = {lb["service"]: v for lb, v in _samples(text, "edgelb_request_size_bytes_sum")}
    assert req_sum["web"] == 1000
    resp_sum = {lb["service"]: v for lb, v in _samples(text, "edgelb_response_size_bytes_sum")}
    assert resp_sum["web"] == 900
    buckets = {lb["le"]: v for lb, v in _samples(text, "edgelb_request_size_bytes_bucket")
               if lb["service"] == "web"}
    assert buckets["64.0"] == 2 and buckets["256.0"] == 2 and buckets["1024.0"] == 3
    assert buckets["6.7108864e+07"] == 3 and buckets["+Inf"] == 3
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package; .ci/run installs it) is missing")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
