"""Route lookup cost against the number of other hosts' routes (issue 18's `make bench`).

One host with 4 header-matched rules and a catch-all (the request matches the last of the
4), beside N other hosts with 4 header-matched rules each; the time of one
`Router.match` for that request, best of a few repetitions, for each N. The router finds a
host's rules with one dict lookup, so the figures should not grow with N.

    python bench/route_lookup.py [N ...]     (default: 10 100 1000 10000)

Prints a table, then one `BENCHJSON {...}` line for bench/bench.py.
"""

from __future__ import annotations

import json
import sys
import time

from edgelb.http.router import Router
from watchers.model import Route, ValueMatch

VARIANTS = 4
TARGET = "target.bench.test"
LINES = [b"Host: target.bench.test\r\n", b"User-Agent: wrk\r\n", b"Accept: */*\r\n",
         b"X-Variant: v3\r\n"]


def host_routes(host: str, order: int) -> list[Route]:
    return [Route(host=host, path="/", service=f"svc{k}", name=f"routes[{order + k}]",
                  headers=(ValueMatch("x-variant", f"v{k}"),), order=order + k)
            for k in range(VARIANTS)]


def table(others: int) -> Router:
    routes: list[Route] = []
    for h in range(others):
        routes += host_routes(f"h{h}.bench.test", len(routes))
    routes += host_routes(TARGET, len(routes))
    routes.append(Route(host="", path="/", service="svc0", name="catch-all", order=len(routes)))
    return Router(routes)


def per_lookup_ns(router: Router, n: int, repeat: int = 5) -> float:
    match = router.match
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            match(TARGET, "/index.html", b"GET", LINES)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [10, 100, 1000, 10000]
    rule = table(1).match(TARGET, "/", b"GET", LINES)
    assert rule is not None and rule.service == "svc3", "the request must match its 4th rule"
    out = {}
    print(f"{'other hosts':>12} {'routes':>8} {'ns per lookup':>14}")
    for others in sizes:
        router = table(others)
        ns = per_lookup_ns(router, 100_000)
        out[str(others)] = round(ns, 1)
        print(f"{others:>12} {others * VARIANTS + VARIANTS + 1:>8} {ns:>14.0f}")
    print("BENCHJSON " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
