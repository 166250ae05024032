"""The ready-made dashboard and alerts (examples/monitoring/) against a running edgelb: every
metric and label their PromQL uses is in its /metrics; `promtool check rules` passes, and
`promtool test rules` shows each alert firing on the series edgelb exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from httpkit import HOST, fetch, free_port, within
from obskit import edgelb  # noqa: F401 (fixture)
from prometheus_client.parser import text_string_to_metric_families
from tlskit import ca

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

MONITORING = Path(__file__).resolve().parent.parent / "examples" / "monitoring"
DASHBOARD = MONITORING / "edgelb-dashboard.json"
RULES = MONITORING / "edgelb-rules.yaml"

# -- reading PromQL -----------------------------------------------------------------------

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                       "or", "unless", "bool", "offset", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r'([A-Za-z_:][\w:]*)?\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][\w:]*")


class Query:
    """What one PromQL expression reads: metric names, (metric, label) pairs its selectors
    match on, and the labels it groups or joins by."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        text = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries ([5m], [$__rate_interval])
        self.selected: set[tuple[str, str]] = set()
        for m in _SELECTOR.finditer(text):
            for label in _MATCHER.findall(m.group(2)):
                self.selected.add((m.group(1) or "", label))
        text = _SELECTOR.sub(lambda m: m.group(1) or "", text)
        self.grouped: set[str] = set()
        for m in _GROUPING.finditer(text):
            self.grouped |= {x.strip() for x in m.group(2).split(",") if x.strip()}
        text = _STRING.sub("", _GROUPING.sub(" ", text))
        self.names: set[str] = set()
        for m in _IDENT.finditer(text):
            word, after = m.group(), text[m.end():].lstrip()
            if after.startswith("(") or word in _KEYWORDS:
                continue  # a function, or an operator word
            if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
                continue  # the tail of a number: 1e3, 0.5
            self.names.add(word)


def test_query_reader_finds_names_labels_and_groupings() -> None:
    q = Query('histogram_quantile(0.99, sum by (service, le) (rate(edgelb_a_bucket{service=~'
              '"$service",code!="x{y}"}[$__rate_interval]))) / ignoring (state) edgelb_b{} '
              "and on(service) edgelb_c - time() < 14 * 86400")
    assert q.names == {"edgelb_a_bucket", "edgelb_b", "edgelb_c"}
    assert q.selected == {("edgelb_a_bucket", "service"), ("edgelb_a_bucket", "code")}
    assert q.grouped == {"service", "le", "state"}


def dashboard_queries() -> list[Query]:
    doc = json.loads(DASHBOARD.read_text())
    out = [Query(t["expr"]) for p in doc["panels"] for t in p.get("targets", ())]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert m is not None, var
            out.append(Query(f"sum by ({m.group(2)}) ({m.group(1)})"))
    return out


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for group in doc["groups"] for r in group["rules"]]


def rule_queries() -> list[Query]:
    return [Query(r["expr"]) for r in rules()]


# -- the files themselves -----------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] == "edgelb" and doc["uid"] and doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names[0] == "datasource"  # chosen at import: no data source uid of ours inside
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", ()):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"].strip(), p["title"]
    # what the issue asks the dashboard to show
    used = set().union(*(q.names for q in dashboard_queries()))
    for name in ("edgelb_requests_total", "edgelb_request_duration_seconds_bucket",
                 "edgelb_backend_inflight", "edgelb_backend_latency_seconds",
                 "edgelb_shed_total", "edgelb_ejections_total", "edgelb_config_reloads_total",
                 "edgelb_watcher_up", "edgelb_tls_certificate_expiry_timestamp_seconds"):
        assert name in used, name


def test_rules_have_the_alerts_asked_for() -> None:
    alerts = {r["alert"]: r for r in rules()}
    for name in ("EdgelbWatcherDown", "EdgelbConfigReloadFailing", "EdgelbHighErrorRatio",
                 "EdgelbCertificateExpiringSoon", "EdgelbBackendEjectedForLong"):
        assert name in alerts, name
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- against a running edgelb -------------------------------------------------------------


def exposed(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """Every sample name /metrics has samples of, with the label names they carry; and the
    names of the families it declares (HELP and TYPE) without a sample now."""
    out: dict[str, set[str]] = {}
    declared: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
        declared |= {fam.name + suffix for suffix in suffixes.get(fam.type, ("",))}
    return out, declared - set(out)


# Families that have no sample in this test's edgelb, and why: only the network watchers
# (Kubernetes, Marathon) hear events from their source; the file watcher polls.
NO_SAMPLE_HERE = {"edgelb_watcher_last_event_age_seconds"}


async def test_every_metric_the_dashboard_and_rules_use_is_exported(
    backend, edgelb, tmp_path: Path  # noqa: F811
) -> None:
    cert, key = ca().issue(["edge.example"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    empty_port = free_port()
    extra = (f"  - name: empty\n    listen: {HOST}:{empty_port}\n    backends: []\n"
             f"entrypoints:\n  https: {{listen: {HOST}:{free_port()}, tls: "
             f"{{cert: {tmp_path / 'tls.crt'}, key: {tmp_path / 'tls.key'}}}}}\n")
    e = await edgelb([await backend("a")], extra=extra)
    assert (await within(fetch(e.port))).status == 200
    assert (await within(fetch(empty_port))).status == 503  # shed: no backend
    async with aiohttp.ClientSession() as http, http.get(e.admin_url + "/metrics") as r:
        metrics, empty = exposed(await r.text())
    # the families that only have samples once something happened have them here
    for name in ("edgelb_shed_total", "edgelb_tls_certificate_expiry_timestamp_seconds",
                 "edgelb_ejections_total", "edgelb_config_last_reload_successful"):
        assert name in metrics, name

    queries = dashboard_queries() + rule_queries()
    used = set().union(*(q.names for q in queries))
    assert used & empty == NO_SAMPLE_HERE
    missing_names = used - set(metrics) - empty
    missing_labels: set[tuple[str, str]] = set()
    for q in queries:
        for name, label in q.selected:
            assert name, f"a selector without a metric name in {q.expr!r}"
            if name in metrics and label not in metrics[name]:
                missing_labels.add((name, label))
        if not q.names & set(metrics):
            continue  # only pending or sample-less metrics: their labels are not to be seen
        have = set().union(*(metrics.get(n, set()) for n in q.names))
        for label in q.grouped - have:
            missing_labels |= {(n, label) for n in q.names}
    assert missing_names == set(), f"not in /metrics: {missing_names}"
    assert missing_labels == set(), f"labels not in /metrics: {missing_labels}"


# -- promtool -----------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run does)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is missing: apt-get install prometheus"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def series(metric: str, values: str, /, **labels: str) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in {"job": "edgelb", "instance": "lb1", **labels}
                     .items())
    return {"series": f"{metric}{{{text}}}", "values": values}


def fires(alert: str, at: str, /, **labels: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": {"job": "edgelb", "instance": "lb1", **labels}}]}


def quiet(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


@needs_promtool
def test_promtool_alerts_fire_on_edgelb_series(tmp_path: Path) -> None:
    day = 86400
    web = {"service": "web"}
    tests = [{
        "interval": "1m",
        "input_series": [
            series("edgelb_watcher_up", "1 1 0x30", watcher="kubernetes"),
            series("edgelb_watcher_up", "1x30", watcher="file"),
            series("edgelb_config_last_reload_successful", "1 0x30", watcher="file"),
            # 10 req/s, of which 2/s are 5xx (20%) on web; 1% on api
            series("edgelb_requests_total", "0+480x30", backend="b1", code="200", **web),
            series("edgelb_requests_total", "0+120x30", backend="", code="503", **web),
            series("edgelb_requests_total", "0+594x30", backend="b1", code="200",
                   service="api"),
            series("edgelb_requests_total", "0+6x30", backend="b1", code="502", service="api"),
            series("edgelb_tls_certificate_expiry_timestamp_seconds", f"{2 * day}x200",
                   name="edge.example", source="tls.crt"),
            series("edgelb_tls_certificate_expiry_timestamp_seconds", f"{60 * day}x200",
                   name="ok.example", source="ok.crt"),
            series("edgelb_backend_ejected", "1x30", backend="b2", **web),
            series("edgelb_backend_ejected", "0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1",
                   backend="b3", **web),
            series("edgelb_service_backends", "2x30", state="all", **web),
            series("edgelb_service_backends", "0x30", state="usable", **web),
            series("edgelb_service_backends", "2x30", state="all", service="api"),
            series("edgelb_service_backends", "2x30", state="usable", service="api"),
        ],
        "alert_rule_test": [
            quiet("EdgelbWatcherDown", "4m"),
            fires("EdgelbWatcherDown", "8m", watcher="kubernetes", severity="critical"),
            quiet("EdgelbConfigReloadFailing", "5m"),
            fires("EdgelbConfigReloadFailing", "12m", watcher="file", severity="warning"),
            # summed over the replicas: one alert per service
            {"eval_time": "20m", "alertname": "EdgelbHighErrorRatio", "exp_alerts": [
                {"exp_labels": {"service": "web", "severity": "warning"}}]},
            fires("EdgelbCertificateExpiring", "15m", name="edge.example",
                  source="tls.crt", severity="critical"),
            fires("EdgelbCertificateExpiringSoon", "2h", name="edge.example",
                  source="tls.crt", severity="warning"),
            fires("EdgelbBackendEjectedForLong", "21m", backend="b2", severity="warning",
                  **web),
            fires("EdgelbServiceHasNoUsableBackend", "6m", severity="critical", **web),
        ],
    }]
    # the same rules without their annotations (prose, checked by `check rules` above), so
    # that an expected alert is its labels
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    stripped = tmp_path / "rules.yaml"
    stripped.write_text(yaml.safe_dump(doc))
    spec = tmp_path / "rules_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(stripped)], "evaluation_interval": "1m",
                                    "tests": tests}))
    proc = promtool("test", "rules", str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
