"""The file config's `routes:`: the model it is read into, the errors by key path (unsafe
regexes, fields the proxy owns, unknown services, shadowed routes) and `edgelb check`."""

from __future__ import annotations

import textwrap

import pytest

from edgelb.ops.config import ConfigError, check_command, parse_config
from watchers.model import Filters, HeaderEdits, Redirect, Rewrite, ValueMatch, WeightedService
from watchers.routing import regex_problem

HEAD = """
entrypoints: {http: {listen: 127.0.0.1:18080}}
services:
  - {name: web, hosts: [web.internal], backends: [127.0.0.1:9001]}
  - {name: canary, hosts: [canary.internal], backends: [127.0.0.1:9002]}
routes:
"""


def config(routes: str):
    return parse_config(HEAD + textwrap.dedent(routes))


def errors(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(routes)
    return info.value.errors


def test_a_route_is_read_into_one_route_per_host_and_match() -> None:
    snap = config("""
      - hosts: [a.example.com, "*.b.example.com"]
        matches:
          - path: {prefix: /api/}
            headers: {X-Canary: "on"}
            query: [{name: v, regex: "[0-9]+"}]
            method: post
          - path: {regex: "/u/[0-9]+"}
        filters:
          request_headers: {set: {x-a: "1"}, add: {x-b: two}, remove: [X-C]}
          response_headers: {add: {x-served: edgelb}}
          rewrite: {host: api.internal, path: /v2}
        backends: [{service: web, weight: 90}, {service: canary, weight: 10}]
        timeout: 2s
    """).snapshot
    routes = [r for r in snap.routes if r.name]  # (the services' hosts come first)
    assert [(r.host, r.path, r.regex) for r in routes] == [
        ("a.example.com", "/api", False), ("a.example.com", "/u/[0-9]+", True),
        ("*.b.example.com", "/api", False), ("*.b.example.com", "/u/[0-9]+", True)]
    first = routes[0]
    assert first.method == "POST"
    assert first.headers == (ValueMatch("x-canary", "on"),)
    assert first.query == (ValueMatch("v", "[0-9]+", regex=True),)
    assert first.backends == (WeightedService("web", 90), WeightedService("canary", 10))
    assert first.service == "web" and first.timeout == 2.0 and first.name == "routes[0]"
    assert first.filters == Filters(
        request_headers=HeaderEdits(set=(("x-a", "1"),), add=(("x-b", "two"),),
                                    remove=("x-c",)),
        response_headers=HeaderEdits(add=(("x-served", "edgelb"),)),
        rewrite=Rewrite(host="api.internal", path="/v2"))



def test_a_service_named_only_in_routes_needs_no_exposure_of_its_own() -> None:
    text = HEAD.replace(" hosts: [web.internal],", "") + "  - backends: [web, canary]\n"
    assert {s.name for s in parse_config(text).snapshot.services} == {"web", "canary"}


def test_a_redirect_only_route_needs_no_backends() -> None:
    route = config("""
      - matches: [{path: {prefix: /old}}]
        filters: {redirect: {scheme: https, prefix: /new, status: 308}}
    """).snapshot.routes[-1]
    assert route.service == "" and route.backends == ()
    assert route.filters is not None
    assert route.filters.redirect == Redirect(scheme="https", prefix="/new", status=308)


@pytest.mark.parametrize(("routes", "path", "words"), [
    ("- matches: [{path: {regex: '/(a+)+'}}]\n  backends: [web]",
     "routes[0].matches[0].path.regex", "a repeat inside a repeat"),
    ("- matches: [{path: {regex: '/(x)\\1'}}]\n  backends: [web]",
     "routes[0].matches[0].path.regex", "backreference"),
    ("- matches: [{path: {regex: '/['}}]\n  backends: [web]",
     "routes[0].matches[0].path.regex", "not a regular expression"),
    (f"- matches: [{{path: {{regex: '/{'a' * 300}'}}}}]\n  backends: [web]",
     "routes[0].matches[0].path.regex", "at most 256"),
    ("- matches: [{headers: [{name: x-u, regex: '(a*)*'}]}]\n  backends: [web]",
     "routes[0].matches[0].headers[0].regex", "a repeat inside a repeat"),
    ("- matches: [{headers: {transfer-encoding: chunked}}]\n  backends: [web]",
     "routes[0].matches[0].headers.transfer-encoding", "cannot be matched"),
    ("- filters: {request_headers: {set: {content-length: '0'}}}\n  backends: [web]",
     "routes[0].filters.request_headers.set.content-length", "set by the proxy itself"),
    ("- filters: {response_headers: {remove: [connection]}}\n  backends: [web]",
     "routes[0].filters.response_headers.remove[0]", "set by the proxy itself"),
    ("- backends: [{service: nope, weight: 1}]",
     "routes[0].backends[0].service", "no http service named 'nope'"),
    ("- backends: [{service: web, weight: 0}]", "routes[0].backends", "every weight is 0"),
    ("- matches: [{method: FETCH}]\n  backends: [web]",
     "routes[0].matches[0].method", "not a method"),
    ("- filters: {redirect: {status: 304}}", "routes[0].filters.redirect.status", "one of 301"),
    ("- filters: {redirect: {path: /x}}\n  backends: [web]",
     "routes[0].filters.redirect", "drop the backends"),
    ("- matches: [{path: {exact: /x}}]\n  filters: {rewrite: {prefix: /y}}\n  backends: [web]",
     "routes[0].matches[0].path", "needs a path prefix match"),
    ("- hosts: [a.example.com]", "routes[0].backends", "needs backends"),
    ("- matches: [{path: {prefix: /a, exact: /a}}]\n  backends: [web]",
     "routes[0].matches[0].path", "exactly one of exact, prefix or regex"),
])
def test_errors_name_the_key_and_the_fix(routes: str, path: str, words: str) -> None:
    errs = errors(textwrap.indent(routes, "  ") + "\n")
    assert len(errs) == 1, errs
    assert errs[0].startswith(path + ": ") and words in errs[0], errs


def test_a_shadowed_route_is_explained() -> None:
    errs = errors("""
      - hosts: [a.example.com]
        matches: [{path: {prefix: /api/}, headers: {x-v: "2"}}]
        backends: [web]
      - hosts: [a.example.com]
        matches: [{path: {prefix: /api}, headers: {X-V: "2"}}]
        backends: [canary]
    """)
    assert errs == ["routes: routes[1] (path prefix /api, host a.example.com, header x-v=2) is "
                    "never chosen: routes[0] has the same host, path, method, headers and "
                    "query parameters and comes first; change one of their conditions or merge "
                    "them (a split between services goes in backends)"]


def test_a_route_that_repeats_a_services_hosts_and_paths_is_explained() -> None:
    text = HEAD.replace("[web.internal]", "[a.example.com]") + \
        "  - {hosts: [a.example.com], backends: [canary]}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert "routes[0] (path prefix /, host a.example.com) is never chosen: service web " \
           "(hosts/paths) has the same" in info.value.errors[0]


def test_check_prints_the_order_routes_are_tried_in(tmp_path, capsys) -> None:
    path = tmp_path / "edgelb.yaml"
    path.write_text(HEAD + textwrap.dedent("""
      - hosts: [a.example.com]
        backends: [web]
      - hosts: [a.example.com]
        matches: [{path: {prefix: /api}, headers: {x-canary: "on"}}]
        backends: [{service: web, weight: 9}, {service: canary, weight: 1}]
      - hosts: [a.example.com]
        matches: [{path: {regex: "/u/[0-9]+"}}]
        backends: [canary]
      - matches: [{path: {exact: /old}}]
        filters: {redirect: {path: /new}}
    """))
    assert check_command(str(path)) == 0
    out = capsys.readouterr().out
    tried = out[out.index("routes: 4"):].splitlines()[1:7]
    assert [line.strip() for line in tried] == [
        "a.example.com",
        "path regex /u/[0-9]+, host a.example.com -> canary 1  [routes[2]]",
        "path prefix /api, host a.example.com, header x-canary=on -> web 9, canary 1  "
        "[routes[1]]",
        "path prefix /, host a.example.com -> web 1  [routes[0]]",
        "(any host)",
        "exact path /old, any host -> redirect 302  [routes[3]]",
    ]


def test_regex_guard() -> None:
    assert regex_problem("/api/v[0-9]+/.*") is None
    assert regex_problem("(ab)+c") is None
    assert regex_problem("(a+)+") is not None
    assert regex_problem("(?<=a)b") is not None


def test_check_lists_what_each_route_does_besides_choosing_a_service() -> None:
    from edgelb.ops.config import summarize

    config = parse_config(textwrap.dedent("""
        entrypoints: {http: {listen: 127.0.0.1:8080}}
        services:
          - {name: web, backends: [{address: 127.0.0.1:9}]}
          - {name: shadow, backends: [{address: 127.0.0.1:9}]}
        routes:
          - hosts: [app.example.com]
            filters:
              request_headers: {set: {x-a: "1"}, remove: [x-b]}
              rewrite: {prefix: /v2}
              mirrors: [{service: shadow, percent: 25}]
              cors: {allow_origins: ["https://ui.example.com"]}
              limits: {rps: 2, connections: 3}
            backends: [{service: web}]
            timeout: 5s
        """))
    text = summarize(config)
    assert ("request headers: 2 edits; rewrite prefix -> /v2; mirror 25% to shadow; CORS for "
            "https://ui.example.com; 2 req/s per client (burst 10); 3 requests in flight per "
            "client; timeout 5s") in text
