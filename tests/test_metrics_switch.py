"""The metrics of part B of issue 16 on a running edgelb: edgelb_build_info, the reload
gauges, edgelb_service_backends, and `metrics: {per_backend: false}` (no series labelled by
backend; the per-service ones stay), switched by a config reload."""

from __future__ import annotations

import asyncio
import platform

import pytest
from httpkit import fetch, within
from obskit import edgelb, labels_of, sample_names, value  # noqa: F401 (fixture)

from edgelb import __version__, compiled
from edgelb.ops.config import ConfigError, MetricsConfig, parse_config, summarize
from edgelb.ops.metrics import ALL_BACKENDS

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(30)]

SERVICES = "services: [{name: web, listen: 10000, backends: []}]\n"


# -- config -------------------------------------------------------------------------------


def test_metrics_section_parses_and_defaults_on() -> None:
    assert parse_config(SERVICES).metrics == MetricsConfig(per_backend=True)
    config = parse_config(SERVICES + "metrics: {per_backend: false}\n")
    assert config.metrics.per_backend is False
    assert "per-backend series off" in summarize(config)
    assert parse_config(SERVICES + "metrics: {}\n").metrics.per_backend is True


@pytest.mark.parametrize(("text", "path", "words"), [
    ("metrics: {per_backend: nope}\n", "metrics.per_backend", "expected true or false"),
    ("metrics: {per_backends: false}\n", "metrics.per_backends", "per_backend"),
    ("metrics: false\n", "metrics", "per_backend: false"),
])
def test_metrics_section_errors_name_the_key(text: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(SERVICES + text)
    (error,) = e.value.errors
    assert error.startswith(path) and words in error, error


# -- a running edgelb ---------------------------------------------------------------------


async def test_build_info_and_reload_gauges(backend, edgelb) -> None:  # noqa: F811
    e = await edgelb([await backend("a")])
    m = await e.scrape()
    (info,) = labels_of(m, "edgelb_build_info")
    assert info == {"version": __version__, "python": platform.python_version(),
                    "build": compiled.build_kind()}
    assert info["build"] in ("compiled", "pure", "partial")
    assert value(m, "edgelb_build_info", **info) == 1
    # a pure run (EDGELB_COMPILE=0) says pure; a compiled one compiled
    assert (info["build"] == "pure") == (compiled.describe() == "pure Python")

    assert value(m, "edgelb_config_last_reload_successful", watcher="file") == 1
    applied = value(m, "edgelb_config_last_reload_success_timestamp_seconds", watcher="file")
    assert applied > 0

    # a rejected edit: 0, and the timestamp stays that of the last success
    e.path.write_text(e.config() + "bogus_key: 1\n")
    e.app.reload()
    runtime = e.app.runtime
    assert runtime is not None

    async def rejected() -> None:
        while not runtime.last_errors.get("file"):
            await asyncio.sleep(0.02)

    await within(rejected())
    m = await e.scrape()
    assert value(m, "edgelb_config_last_reload_successful", watcher="file") == 0
    assert value(m, "edgelb_config_last_reload_success_timestamp_seconds",
                 watcher="file") == applied


async def test_service_backends_counts_states(backend, edgelb) -> None:  # noqa: F811
    a, b = await backend("a"), await backend("b")
    e = await edgelb([a, b])
    m = await e.scrape()
    counts = {dict(k)["state"]: v
              for k, v in m["edgelb_service_backends"]["edgelb_service_backends"].items()
              if dict(k)["service"] == "web"}
    assert counts == {"all": 2, "healthy": 2, "usable": 2, "eligible": 2, "ejected": 0,
                      "draining": 0}
    await b.stop()
    e.backends = [a]
    await e.reload()
    m = await e.scrape()
    assert value(m, "edgelb_service_backends", service="web", state="all") == 1


async def test_per_backend_off_drops_backend_series_and_keeps_the_rest(
    backend, edgelb  # noqa: F811
) -> None:
    a, b = await backend("a"), await backend("b")
    e = await edgelb([a, b])
    # least-loaded breaks ties at random: go on until both backends have served (bounded)
    sent, seen = 0, set()
    while len(seen) < 2 or sent < 6:
        assert sent < 200, "one backend never chosen"
        resp = await within(fetch(e.port))
        assert resp.status == 200
        seen.add(resp.body.split()[0])
        sent += 1
    before = await e.scrape()
    with_backend = {name for name, samples in before.items()
                    if any("backend" in dict(k) for s in samples.values() for k in s)}
    assert {"edgelb_backend_inflight", "edgelb_backend_healthy", "edgelb_ejections_total",
            "edgelb_backend_latency_seconds", "edgelb_requests_total"} <= with_backend
    served = {dict(k)["backend"] for k in before["edgelb_requests_total"][
        "edgelb_requests_total"]}
    assert served == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    total_before = sum(before["edgelb_requests_total"]["edgelb_requests_total"].values())

    await e.reload("metrics: {per_backend: false}\n")
    after = await e.scrape()
    # every family with a backend label is gone, except the request counter, summed
    for name in with_backend - {"edgelb_requests_total"}:
        assert name not in after, name
    requests = after["edgelb_requests_total"]["edgelb_requests_total"]
    assert {dict(k)["backend"] for k in requests} == {ALL_BACKENDS}
    assert value(after, "edgelb_requests_total", service="web", backend=ALL_BACKENDS,
                 code="200", method="GET", code_class="2xx") == total_before
    # the rest stays: same families, the same per-service series
    assert set(after) == set(before) - (with_backend - {"edgelb_requests_total"})
    kept_names = sample_names(after)
    for name in ("edgelb_request_duration_seconds_bucket", "edgelb_bytes_total",
                 "edgelb_service_backends", "edgelb_build_info",
                 "edgelb_watcher_up", "edgelb_config_reloads_total"):
        assert name in kept_names, name
    for name in set(before) - with_backend:  # the very same series, per service or global
        assert {k for s in after[name].values() for k in s} == {
            k for s in before[name].values() for k in s}, name
    assert value(after, "edgelb_service_backends", service="web", state="healthy") == 2
    assert value(after, "edgelb_request_duration_seconds_count", service="web", method="GET",
                 code_class="2xx") == sent

    # and back on: per-backend series return with their counts (the counters never reset)
    await e.reload()
    again = await e.scrape()
    assert with_backend <= set(again)
    assert sum(again["edgelb_requests_total"]["edgelb_requests_total"].values()) == total_before
