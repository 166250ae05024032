"""The router's own promises: a host's rules are found without looking at other hosts',
the precedence of watchers/routing.py, and the deterministic weighted picker."""

from __future__ import annotations

from edgelb.http import router as router_module
from edgelb.http.router import Picker, Router
from watchers.model import Route, ValueMatch, WeightedService


def test_a_lookup_tries_only_its_hosts_rules(monkeypatch) -> None:
    others = [Route(f"h{i}.example.com", "/", "web", headers=(ValueMatch("x", "1"),))
              for i in range(5000)]
    table = Router([*others, Route("www.example.com", "/api", "api",
                                   headers=(ValueMatch("x", "1"),))])
    tried = []
    real = router_module.Rule.matches

    def counting(self, *args):
        tried.append(self.route.host)
        return real(self, *args)

    monkeypatch.setattr(router_module.Rule, "matches", counting)
    rule = table.match("www.example.com", "/api/x", b"GET", [b"x: 1\r\n"])
    assert rule is not None and rule.service == "api"
    assert tried == ["www.example.com"]


def test_precedence_within_a_host() -> None:
    routes = [
        Route("a.example.com", "/", "root"),
        Route("a.example.com", "/api", "prefix"),
        Route("a.example.com", "/api/.*", "regex", regex=True),
        Route("a.example.com", "/api/x", "exact", exact=True),
        Route("a.example.com", "/api", "method", method="DELETE"),
        Route("a.example.com", "/api", "header", headers=(ValueMatch("x-v", "2"),)),
        Route("a.example.com", "/api", "query", query=(ValueMatch("q", "1"),)),
        Route("*.example.com", "/api", "wild", headers=(ValueMatch("x-v", "2"),)),
    ]
    table = Router(reversed(routes))  # the order given does not decide

    def svc(path: str, method: bytes = b"GET", lines: list[bytes] | None = None,
            host: str = "a.example.com") -> str | None:
        rule = table.match(host, path, method, lines or [])
        return rule.service if rule is not None else None

    assert svc("/api/x") == "exact"
    assert svc("/api/y") == "regex"
    assert svc("/api", b"DELETE", [b"X-V: 2\r\n"]) == "method"
    assert svc("/api", b"GET", [b"X-V: 2\r\n"]) == "header"
    assert svc("/api?q=1", b"GET", [b"X-V: 3\r\n"]) == "query"
    assert svc("/api") == "prefix"
    assert svc("/other") == "root"
    assert svc("/api", b"GET", [b"X-V: 2\r\n"], "b.example.com") == "wild"


def test_the_picker_is_exact_over_every_cycle_and_smooth() -> None:
    picker = Picker([("web", 90), ("canary", 10), ("off", 0)])
    picks = [picker.pick() for _ in range(1000)]
    assert picks.count("web") == 900 and picks.count("canary") == 100
    assert "off" not in picks
    assert all(picks[i:i + 100].count("canary") == 10 for i in range(0, 1000, 100))
    assert "canary canary" not in " ".join(picks)  # spread, not in bursts


def test_one_picker_per_route_across_its_hosts_and_matches() -> None:
    split = (WeightedService("a", 1), WeightedService("b", 1))
    table = Router([Route("x.example.com", "/", "a", backends=split, name="routes[0]"),
                    Route("y.example.com", "/", "a", backends=split, name="routes[0]")])
    first = table.match("x.example.com", "/")
    second = table.match("y.example.com", "/")
    assert first is not None and second is not None
    assert [first.pick(), second.pick(), first.pick(), second.pick()] == ["a", "b", "a", "b"]


def test_a_rebuilt_table_keeps_an_unchanged_splits_place() -> None:
    """A reload (a status write, an unrelated change) must not restart a split's cycle: with
    a fresh picker each time, a 1:1 split re-applied after every request sends every request
    to its first service."""
    split = (WeightedService("a", 1), WeightedService("b", 1))
    route = Route("x.example.com", "/", "a", backends=split, name="routes[0]")
    table = Router([route])
    picks = []
    for _ in range(6):
        rule = table.match("x.example.com", "/")
        assert rule is not None
        picks.append(rule.pick())
        table = Router([route], table)
    assert picks == ["a", "b"] * 3
    changed = Route("x.example.com", "/", "a", name="routes[0]",
                    backends=(WeightedService("a", 1), WeightedService("b", 3)))
    fresh = Router([changed], table).match("x.example.com", "/")
    assert fresh is not None and [fresh.pick() for _ in range(4)].count("b") == 3


def test_a_gateway_wildcard_covers_several_labels_and_an_ingress_one_only() -> None:
    table = Router([Route("*.example.com", "/", "gw", any_depth=True),
                    Route("*.b.example.com", "/", "deeper", any_depth=True),
                    Route("*.example.org", "/", "ingress")])
    assert table.lookup("a.example.com", "/") == "gw"
    assert table.lookup("x.y.example.com", "/") == "gw"
    assert table.lookup("x.y.b.example.com", "/") == "deeper"  # the longer suffix wins
    assert table.lookup("a.b.example.com", "/") == "deeper"
    assert table.lookup("example.com", "/") is None
    assert table.lookup("a.example.org", "/") == "ingress"
    assert table.lookup("x.a.example.org", "/") is None  # Ingress: exactly one label
