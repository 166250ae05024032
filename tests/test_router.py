"""Router: host exact / one-label wildcard / any, element-wise path prefixes, longest wins.

Examples pin the rules down; hypothesis checks them against a small reference model.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgelb.http.router import Router, path_matches
from watchers.model import Route


def r(host: str, path: str, service: str, exact: bool = False) -> Route:
    return Route(host=host, path=path, service=service, exact=exact)


def test_exact_host_wins_over_wildcard_and_any() -> None:
    router = Router([r("", "/", "any"), r("*.example.com", "/", "wild"),
                     r("www.example.com", "/", "www")])
    assert router.lookup("www.example.com", "/") == "www"
    assert router.lookup("api.example.com", "/x") == "wild"
    assert router.lookup("example.org", "/x") == "any"


def test_wildcard_covers_exactly_one_label() -> None:
    router = Router([r("*.example.com", "/", "wild")])
    assert router.lookup("a.example.com", "/") == "wild"
    assert router.lookup("a.b.example.com", "/") is None
    assert router.lookup("example.com", "/") is None
    assert router.lookup(".example.com", "/") is None
    assert router.lookup("aexample.com", "/") is None


def test_host_is_case_insensitive_and_port_and_trailing_dot_are_ignored() -> None:
    router = Router([r("Web.Example.com", "/", "web"), r("*.Wild.io", "/", "wild")])
    assert router.lookup("WEB.example.COM:8443", "/") == "web"
    assert router.lookup("web.example.com.", "/") == "web"
    assert router.lookup("X.wild.io:80", "/") == "wild"
    v6 = Router([r("", "/", "any")])
    assert v6.lookup("[::1]:8080", "/") == "any"


def test_prefix_matches_element_wise() -> None:
    router = Router([r("", "/foo", "foo")])
    assert router.lookup("h", "/foo") == "foo"
    assert router.lookup("h", "/foo/") == "foo"
    assert router.lookup("h", "/foo/bar") == "foo"
    assert router.lookup("h", "/foo?x=1") == "foo"
    assert router.lookup("h", "/foobar") is None
    assert router.lookup("h", "/fo") is None
    assert router.lookup("h", "/") is None


def test_trailing_slash_in_a_prefix_is_ignored() -> None:
    router = Router([r("", "/api/", "api")])
    assert router.lookup("h", "/api") == "api"
    assert router.lookup("h", "/api/v1") == "api"
    assert router.lookup("h", "/apix") is None


def test_longest_prefix_wins_whatever_the_order() -> None:
    routes = [r("", "/", "root"), r("", "/a", "a"), r("", "/a/b", "ab"), r("", "/a/b/c", "abc")]
    for order in (routes, routes[::-1]):
        router = Router(order)
        assert router.lookup("h", "/a/b/c/d") == "abc"
        assert router.lookup("h", "/a/b/x") == "ab"
        assert router.lookup("h", "/a/bc") == "a"
        assert router.lookup("h", "/z") == "root"


def test_exact_path_before_prefix_of_same_length() -> None:
    router = Router([r("", "/login", "prefix"), r("", "/login", "exact", exact=True)])
    assert router.lookup("h", "/login") == "exact"
    assert router.lookup("h", "/login/x") == "prefix"
    only_exact = Router([r("", "/login", "exact", exact=True)])
    assert only_exact.lookup("h", "/login/") is None


def test_host_rules_fall_through_to_less_specific_hosts() -> None:
    router = Router([r("www.example.com", "/shop", "shop"), r("*.example.com", "/", "wild"),
                     r("", "/", "any")])
    assert router.lookup("www.example.com", "/shop/1") == "shop"
    assert router.lookup("www.example.com", "/blog") == "wild"
    assert router.lookup("other.net", "/shop") == "any"


def test_no_match_is_none() -> None:
    assert Router().lookup("h", "/") is None
    assert Router([r("a.com", "/", "a")]).lookup("b.com", "/") is None


# -- properties ------------------------------------------------------------------------

segment = st.text(alphabet="abc-", min_size=1, max_size=3)
paths = st.lists(segment, min_size=0, max_size=4).map(lambda xs: "/" + "/".join(xs))
hosts = st.sampled_from(["", "a.example.com", "b.example.com", "*.example.com", "x.a.example.com",
                         "*.a.example.com", "example.com"])
request_hosts = st.sampled_from(["a.example.com", "b.example.com", "c.example.com",
                                 "x.a.example.com", "y.a.example.com", "z.y.a.example.com",
                                 "example.com", "other.org"])


@given(path=paths, extra=st.lists(segment, max_size=3), query=st.sampled_from(["", "?q=1"]))
def test_a_path_always_matches_its_own_prefix_rule(path: str, extra: list[str],
                                                   query: str) -> None:
    router = Router([r("", path, "svc")])
    assert router.lookup("any.host", path + query) == "svc"
    below = path.rstrip("/") + "".join("/" + e for e in extra)
    assert router.lookup("any.host", (below or "/") + query) == "svc"


@given(prefix=paths.filter(lambda p: p != "/"), tail=segment)
def test_a_prefix_never_matches_a_longer_element(prefix: str, tail: str) -> None:
    router = Router([r("", prefix, "svc")])
    assert router.lookup("h", prefix + tail) is None
    assert not path_matches(prefix + tail, prefix, False)


def reference(routes: list[Route], host: str, path: str) -> str | None:
    """The routing rules written out plainly: the most specific host tier that has a matching
    rule decides; within it, the longest rule path, an exact rule before a prefix."""
    path = path.split("?", 1)[0]

    def matches(rule: Route) -> bool:
        if rule.exact:
            return path == rule.path
        prefix = rule.path.rstrip("/") or "/"
        if prefix == "/":
            return True
        parts, want = path.split("/"), prefix.split("/")
        return parts[: len(want)] == want

    def host_tier(rule: Route) -> int | None:
        if rule.host == host:
            return 0
        if rule.host.startswith("*.") and host.endswith(rule.host[1:]):
            label = host[: -len(rule.host) + 1]
            return 1 if label and "." not in label else None
        return 2 if rule.host == "" else None

    best: tuple[int, int, int] | None = None
    found = None
    for rule in routes:
        tier = host_tier(rule)
        if tier is None or not matches(rule):
            continue
        norm = rule.path if rule.exact else (rule.path.rstrip("/") or "/")
        key = (tier, -len(norm), 0 if rule.exact else 1)
        if best is None or key < best:
            best, found = key, rule.service
    return found


route_lists = st.lists(
    st.tuples(hosts, paths, st.booleans()), max_size=12, unique_by=lambda t: (t[0], t[1], t[2])
).map(lambda ts: [r(h, p, f"s{i}", exact) for i, (h, p, exact) in enumerate(ts)])


@settings(max_examples=300, deadline=None)
@given(routes=route_lists, host=request_hosts, path=paths)
def test_router_agrees_with_the_reference_model(routes: list[Route], host: str,
                                                path: str) -> None:
    # prefixes that normalise to the same rule would be ambiguous; config rejects them
    seen: set[tuple[str, str, bool]] = set()
    unique = []
    for rule in routes:
        key = (rule.host, rule.path if rule.exact else (rule.path.rstrip("/") or "/"), rule.exact)
        if key not in seen:
            seen.add(key)
            unique.append(rule)
    assert Router(unique).lookup(host, path) == reference(unique, host, path)
