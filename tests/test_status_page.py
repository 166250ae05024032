"""The live status page in a real browser (headless Chromium, driven over DevTools): traffic
sent through a running edgelb moves the page's rates and charts without a reload; hostile
names stay text through the live updates; without JavaScript the server-rendered page has the
totals and rates and reloads itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cdpkit import CHROMIUM, Browser, PageError
from httpkit import HOST, fetch, free_port, within
from obskit import edgelb  # noqa: F401 (fixture)
from test_admin import make_runtime
from tlskit import ca

from edgelb.ops import admin as admin_module
from edgelb.ops.admin import AdminServer
from edgelb.pool import ServiceState
from watchers.model import Address, Backend, Service

pytestmark = [
    pytest.mark.uvloop,
    pytest.mark.timeout(60),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)"),
]

REFRESH = 0.25  # the page's updates and the rates' interval, shortened for the test

# What the page shows of one service, read in the browser.
SERVICE_VIEW = """
(() => {
  const s = [...document.querySelectorAll("section.service")]
    .find(e => e.dataset.service === %s);
  if (!s) return null;
  const ys = (s.querySelector('[data-chart="requests"]').getAttribute("points") || "")
    .split(" ").filter(p => p).map(p => parseFloat(p.split(",")[1]));
  const f = name => s.querySelector('[data-field="' + name + '"]').textContent;
  return {rate: f("rate"), errors: f("errors"), requests: f("requests"), ys: ys,
          total: document.getElementById("total-rate").textContent,
          live: document.getElementById("live").textContent,
          marker: window.edgelbTestMarker || null};
})()
"""


def view(service: str) -> str:
    return SERVICE_VIEW % json.dumps(service)  # a JS string literal


def per_second(text: str) -> float:
    m = re.fullmatch(r"([\d.,]+)/s", text)
    assert m, text
    return float(m.group(1).replace(",", ""))


@pytest.fixture
def fast_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "REFRESH_SECONDS", REFRESH)
    monkeypatch.setattr(admin_module, "WINDOW_SECONDS", 30.0)


@pytest.fixture
async def browsers(tmp_path: Path) -> Any:
    opened: list[Browser] = []

    async def open_(url: str, javascript: bool = True) -> Browser:
        b = await Browser.open(url, tmp_path / f"profile{len(opened)}", javascript)
        opened.append(b)
        return b

    yield open_
    for b in opened:
        await b.close()


async def test_traffic_moves_the_rate_and_the_chart_without_a_reload(
    backend, edgelb, browsers, fast_refresh, tmp_path: Path  # noqa: F811
) -> None:
    cert, key = ca().issue(["edge.example"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    extra = (f"entrypoints:\n  https: {{listen: {HOST}:{free_port()}, tls: "
             f"{{cert: {tmp_path / 'tls.crt'}, key: {tmp_path / 'tls.key'}}}}}\n")
    e = await edgelb([await backend("a")], extra=extra)
    page = await browsers(e.admin_url + "/status")
    await page.until('document.getElementById("live").textContent.startsWith("live, updated")',
                     what="the page's first update from /status.json")
    await page.evaluate("window.edgelbTestMarker = 'same page'")
    before = await page.evaluate(view("web"))
    assert before["rate"] == "0/s" and before["requests"] == "0"
    assert all(y >= 46.9 for y in before["ys"])  # a flat line at the bottom, if any

    stop = asyncio.Event()
    sent = 0

    async def traffic() -> None:  # bounded: at most 3000 requests, until told to stop
        nonlocal sent
        while not stop.is_set() and sent < 3000:
            assert (await within(fetch(e.port))).status == 200
            sent += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(traffic())
    try:
        moved = await page.until(
            f"(v => v && parseFloat(v.rate) > 0 && Math.min(...v.ys) < 40 "
            f"&& v.requests !== '0' ? v : null)({view('web').strip()})",
            what="the rate and the requests chart rising with the traffic")
    finally:
        stop.set()
        await within(task, 10)
    assert per_second(moved["rate"]) > 0 and per_second(moved["total"]) > 0
    assert moved["errors"] == "0/s"
    assert moved["marker"] == "same page"  # updated in place, never reloaded
    assert 0 < int(moved["requests"]) <= sent

    # traffic stopped: the rate falls back to 0 and the line comes down at the right edge
    after = await page.until(
        f"(v => v && v.rate === '0/s' && v.ys[v.ys.length - 1] >= 46.9 ? v : null)"
        f"({view('web').strip()})", what="the rate falling back to 0")
    assert after["requests"] == str(sent) and after["marker"] == "same page"
    assert max(after["ys"]) >= 46.9 and min(after["ys"]) < 40  # the burst is still on it

    # the certificate and the watcher, as the page shows them
    cert_row = await page.evaluate(
        "[...document.querySelectorAll('tr[data-expires]')].map(r => r.textContent)")
    assert len(cert_row) == 1 and "edge.example" in cert_row[0]
    days = float(await page.evaluate(
        "document.querySelector('tr[data-expires] [data-field=\"days\"]').textContent"))
    assert 29 < days <= 30  # tlskit issues for 30 days
    watcher = await page.evaluate(
        "document.querySelector('tr[data-watcher=\"file\"]').textContent")
    assert "synced" in watcher

    # everything came from edgelb: the page says so to the browser
    async with aiohttp.ClientSession() as http, http.get(e.admin_url + "/status") as r:
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp


HOSTILE = '<img src=x onerror="window.edgelbOwned=1"><script>window.edgelbOwned=2</script>&'


async def test_hostile_names_stay_text_through_live_updates(browsers, fast_refresh) -> None:
    runtime = make_runtime()
    svc = ServiceState(Service(name=HOSTILE, backends=(Backend("10.0.0.7", 8080),)))
    runtime.services[HOSTILE] = svc
    runtime.watcher_up[HOSTILE] = True
    runtime.watcher_synced[HOSTILE] = True
    runtime.last_errors[HOSTILE] = HOSTILE
    server = AdminServer(runtime, Address(HOST, 0))
    await server.start()
    try:
        page = await browsers(server.url + "/status")
        await page.until('document.getElementById("live").textContent.startsWith("live")')
        # the data path's counters move: the live update writes the hostile section
        svc.pool.by_key["10.0.0.7:8080"].responses[200] = 7
        seen = await page.until(f"(v => v && v.requests === '7' ? v : null)({view(HOSTILE)})",
                                what="the hostile service's section updated")
        assert seen["live"].startswith("live, updated")
        found = await page.evaluate("""({
          owned: window.edgelbOwned || null,
          scripts: document.querySelectorAll("script").length,
          images: document.querySelectorAll("img").length,
          titles: [...document.querySelectorAll("section.service h3")].map(h => h.textContent),
          watcher: [...document.querySelectorAll("tr[data-watcher]")]
            .map(r => [r.cells[0].textContent, r.querySelector('[data-field="last_error"]')
              .textContent]),
        })""")
        assert found["owned"] is None
        assert found["scripts"] == 1 and found["images"] == 0
        assert HOSTILE in found["titles"]
        assert [HOSTILE, HOSTILE] in found["watcher"]
    finally:
        await server.stop()


async def test_without_javascript_the_page_has_totals_and_rates(
    backend, edgelb, browsers, fast_refresh  # noqa: F811
) -> None:
    e = await edgelb([await backend("a")])
    stop = asyncio.Event()
    sent = 0

    async def traffic() -> None:  # bounded: at most 3000 requests, until told to stop
        nonlocal sent
        while not stop.is_set() and sent < 3000:
            assert (await within(fetch(e.port))).status == 200
            sent += 1
            await asyncio.sleep(0.002)

    def shown_rate(dom: str) -> float:
        m = re.search(r'data-field="rate">([^<]+)<', dom)
        return per_second(m.group(1)) if m else 0.0

    task = asyncio.create_task(traffic())
    try:
        page = await browsers(e.admin_url + "/status", javascript=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        dom = ""
        # the page reloads itself: catch a whole one rendered while the traffic ran
        while "</footer>" not in dom or shown_rate(dom) == 0:
            assert loop.time() < deadline, f"no whole page with a rate within 10 s: {dom!r}"
            with contextlib.suppress(PageError):
                dom = await page.outer_html()
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await within(task, 10)
    assert "static page: reloads every 0.25 s" in dom  # the script did not run
    assert '<meta http-equiv="refresh" content="0.25">' in dom
    m = re.search(r'data-field="requests">(\d+)<', dom)
    assert m and 0 < int(m.group(1)) <= sent
    assert re.search(r'data-chart="requests" points="[^"]+"', dom)  # the chart, server-drawn
