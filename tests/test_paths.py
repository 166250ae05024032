"""Path confusion at the edge: a path-protected service is never reached without credentials.

A service on `/admin` with basic auth and another on `/`, routed on an entrypoint of a real
config file (the whole process, in-loop). Each confusing target of the catalogue below must be
refused with 400, or routed to `/admin` (401: never reaching its backend), or reach the `/`
service with a path that is not `/admin` by any reading; the test checks which, and the exact
target the backend receives. The normaliser itself (edgelb/http/target.py) is checked as a
pure function too, with properties over arbitrary bytes.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from httpkit import HOST, Client, HttpBackend, free_port, within
from hypothesis import given
from hypothesis import strategies as st

from edgelb.http.target import needs_normalising, normalise
from edgelb.net.acl import sha_crypt
from edgelb.ops.app import App

pytestmark = [pytest.mark.uvloop, pytest.mark.timeout(60)]

REFUSED = "400"
ADMIN = "admin"  # routed to the protected service: 401 without credentials


@dataclass(frozen=True)
class Case:
    target: str
    outcome: str  # REFUSED, ADMIN, or the exact target the "/" service's backend receives
    why: str


CATALOGUE = [
    # dot segments and repeated slashes
    Case("//admin", ADMIN, "a doubled leading slash"),
    Case("///admin", ADMIN, "three slashes"),
    Case("/admin//", ADMIN, "trailing doubled slash"),
    Case("/x/../admin", ADMIN, "a dot-dot segment"),
    Case("/./admin", ADMIN, "a dot segment"),
    Case("/admin/.", ADMIN, "a trailing dot segment"),
    Case("/admin/./", ADMIN, "a dot segment before the trailing slash"),
    Case("/x/./../admin", ADMIN, "dot then dot-dot"),
    Case("/x/y/../../admin", ADMIN, "two levels up"),
    Case("//x//..//admin", ADMIN, "doubled slashes around a dot-dot"),
    Case("/admin/..", "/", "up from /admin is the root"),
    Case("/..", REFUSED, "climbs above the root"),
    Case("/../admin", REFUSED, "climbs above the root, then /admin"),
    Case("/x/../../admin", REFUSED, "climbs above the root from below"),
    # percent-encoded dots and letters (unreserved characters are decoded)
    Case("/%2e%2e/admin", REFUSED, "encoded dot-dot above the root"),
    Case("/x/%2e%2e/admin", ADMIN, "an encoded dot-dot"),
    Case("/x/%2E%2E/admin", ADMIN, "an encoded dot-dot, upper-case hex"),
    Case("/x/.%2e/admin", ADMIN, "half-encoded dot-dot"),
    Case("/%2e/admin", ADMIN, "an encoded dot"),
    Case("/%61dmin", ADMIN, "an encoded letter"),
    Case("/%61%64%6d%69%6e", ADMIN, "every letter encoded"),
    Case("/%61%64%6D%69%6E", ADMIN, "every letter encoded, mixed-case hex"),
    Case("/%41dmin", "/Admin", "an encoded capital: paths are case-sensitive"),
    Case("/ADMIN", "/ADMIN", "another path: case-sensitive"),
    Case("/adminx", "/adminx", "a longer element is another path"),
    # encoded slashes and backslashes
    Case("/admin%2f", REFUSED, "an encoded slash"),
    Case("/admin%2F", REFUSED, "an encoded slash, upper-case"),
    Case("/admin%2fsecret", REFUSED, "an encoded slash inside"),
    Case("/%2fadmin", REFUSED, "an encoded leading slash"),
    Case("/x/%2e%2e%2fadmin", REFUSED, "encoded dot-dot-slash"),
    Case("/admin%5c", REFUSED, "an encoded backslash"),
    Case("/admin%5Cx", REFUSED, "an encoded backslash inside"),
    Case("/admin\\", REFUSED, "a raw backslash"),
    Case("/\\admin", REFUSED, "a raw backslash first"),
    Case("/x\\..\\admin", REFUSED, "backslash dot-dot"),
    # double percent-encoding: decoded once by a backend, it is still not /admin
    Case("/%252e%252e/admin", "/%252e%252e/admin", "double-encoded dots stay encoded"),
    Case("/%2561dmin", "/%2561dmin", "a double-encoded letter stays encoded"),
    Case("/%252fadmin", "/%252fadmin", "a double-encoded slash stays encoded"),
    # NUL and invalid escapes
    Case("/%00admin", REFUSED, "an encoded NUL"),
    Case("/admin%00", REFUSED, "a trailing encoded NUL"),
    Case("/%zzadmin", REFUSED, "not hex"),
    Case("/admin%", REFUSED, "a lone percent sign"),
    Case("/admin%4", REFUSED, "one hex digit"),
    # overlong UTF-8 (the old IIS traversal)
    Case("/x/%c0%ae%c0%ae/admin", REFUSED, "overlong dots"),
    Case("/%c0%afadmin", REFUSED, "an overlong slash"),
    Case("/%e0%80%afadmin", REFUSED, "a three-byte overlong slash"),
    Case("/%f0%80%80%afadmin", REFUSED, "a four-byte overlong slash"),
    Case("/caf%c3%a9", "/caf%C3%A9", "valid UTF-8 is kept encoded, hex upper-cased"),
    # ;parameters (Tomcat and Spring read /admin;x as /admin)
    Case("/admin;x=1", ADMIN, "a path parameter"),
    Case("/admin;/", ADMIN, "an empty parameter"),
    Case("/admin;jsessionid=abc/secret", ADMIN, "a session id parameter"),
    Case("/..;/admin", REFUSED, "a dot-dot with a parameter"),
    Case("/x/..;/admin", REFUSED, "a dot-dot with a parameter, below the root"),
    Case("/x/.;/admin", REFUSED, "a dot with a parameter"),
    # the query is not the path
    Case("/admin?next=/../x", ADMIN, "a query with dots"),
    Case("/public?to=//admin", "/public?to=//admin", "the query is passed as it is"),
    Case("/public/%7euser", "/public/~user", "an encoded tilde is decoded"),
    # absolute-form targets are normalised too
    Case(f"http://{HOST}/x/../admin", ADMIN, "absolute-form with a dot-dot"),
    Case(f"http://{HOST}//admin", ADMIN, "absolute-form with a doubled slash"),
]

HASH = sha_crypt("s3cret", "$6$rounds=1000$saltsaltsalt")


def config(admin: int, port: int, admin_backend: HttpBackend, public: HttpBackend,
           entrypoint_extra: str = "") -> str:
    return "\n".join([
        f"admin: {{listen: {HOST}:{admin}}}",
        "entrypoints:",
        f"  web: {{listen: {HOST}:{port}{entrypoint_extra}}}",
        "services:",
        "  - name: admin",
        "    paths: [/admin]",
        f"    auth: {{realm: ops, users: ['alice:{HASH}']}}",
        f"    backends: [{{address: {HOST}:{admin_backend.port}}}]",
        "  - name: public",
        "    paths: [/]",
        f"    backends: [{{address: {HOST}:{public.port}}}]",
    ]) + "\n"


@dataclass
class Edge:
    port: int
    admin: HttpBackend
    public: HttpBackend


async def _start(tmp_path: Path, extra: str = "") -> AsyncIterator[Edge]:
    admin_b = await HttpBackend("admin").start()
    public_b = await HttpBackend("public").start()
    port = free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(config(free_port(), port, admin_b, public_b, extra))
    app = App(path)
    await within(app.start())
    try:
        yield Edge(port, admin_b, public_b)
    finally:
        await within(app.stop(), 10)
        await admin_b.stop()
        await public_b.stop()


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    async for e in _start(tmp_path):
        yield e


async def _get(port: int, target: str, headers: list[tuple[str, str]] | None = None):
    c = await Client.open(port)
    try:
        return await within(c.request("GET", target, headers or []))
    finally:
        c.close()


def test_the_catalogue_is_big_and_has_each_outcome() -> None:
    assert len(CATALOGUE) >= 40
    assert len({c.target for c in CATALOGUE}) == len(CATALOGUE)
    outcomes = {c.outcome if c.outcome in (REFUSED, ADMIN) else "public" for c in CATALOGUE}
    assert outcomes == {REFUSED, ADMIN, "public"}


async def test_confusing_paths_never_reach_the_protected_service_without_credentials(
        edge: Edge) -> None:
    wrong = []
    for case in CATALOGUE:
        before = len(edge.public.requests)
        r = await _get(edge.port, case.target)
        if case.outcome == REFUSED:
            ok = r.status == 400
        elif case.outcome == ADMIN:
            ok = r.status == 401 and "ops" in (r.get("www-authenticate") or "")
        else:
            got = [q.target for q in edge.public.requests[before:]]
            ok = r.status == 200 and got == [case.outcome]
        if not ok:
            got = [q.target for q in edge.public.requests[before:]]
            wrong.append(f"{case.target!r} ({case.why}): {r.status}, public backend got {got}")
    assert not wrong, "\n".join(wrong)
    assert edge.admin.requests == []  # never reached without credentials


async def test_with_credentials_the_backend_receives_the_normalised_path(edge: Edge) -> None:
    auth = [("Authorization", "Basic " + base64.b64encode(b"alice:s3cret").decode())]
    for target, expected in [("//admin", "/admin"), ("/x/../admin/./a", "/admin/a"),
                             ("/%61dmin;x=1?q=%2e", "/admin;x=1?q=%2e"),
                             ("/admin/b/..", "/admin/")]:
        r = await _get(edge.port, target, auth)
        assert r.status == 200, target
        assert edge.admin.requests[-1].target == expected


async def test_a_refused_path_answers_in_turn_on_a_pipelined_connection(edge: Edge) -> None:
    c = await Client.open(edge.port)
    try:
        await c.send(f"GET /a HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
                     f"GET /a%2fb HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
                     f"GET /c HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        first = await within(c.response())
        second = await within(c.response())
        assert (first.status, second.status) == (200, 400)
        assert await within(c.at_eof()) == b""  # nothing after the refusal is read
    finally:
        c.close()
    assert [q.target for q in edge.public.requests] == ["/a"]


async def test_merge_slashes_false_and_encoded_slashes_keep_on_an_entrypoint(
        tmp_path: Path) -> None:
    """A user who needs `//` or `%2F` passed on says so on the listener; the router then reads
    the path as it is (a literal `%2F` is no separator, `//admin` is not `/admin`)."""
    extra = ", merge_slashes: false, encoded_slashes: keep"
    async for e in _start(tmp_path, extra):
        for target, expected in [("/v2/library%2fredis/tags", "/v2/library%2Fredis/tags"),
                                 ("/proxy/http://x", "/proxy/http://x"),
                                 ("/a/./b", "/a/b")]:
            r = await _get(e.port, target)
            assert r.status == 200
            assert e.public.requests[-1].target == expected
        assert (await _get(e.port, "/x/../admin")).status == 401  # dot segments still go
        assert (await _get(e.port, "/%00")).status == 400


# -- the normaliser as a pure function ---------------------------------------------------------

_path_bytes = st.binary(max_size=40).map(lambda b: b"/" + b)
_pathish = st.lists(st.sampled_from([b"/", b".", b"..", b"%2e", b"%2E", b"%2f", b"%41", b"a",
                                     b";", b"%", b"%c0%ae", b"\\", b"?", b"%00", b"//"]),
                    max_size=12).map(lambda parts: b"/" + b"".join(parts))


@given(target=st.one_of(_path_bytes, _pathish))
def test_normalise_never_raises_and_its_output_is_a_fixed_point(target: bytes) -> None:
    out = normalise(target)
    if isinstance(out, str):
        return
    path = out.split(b"?", 1)[0]
    assert path.startswith(b"/")
    assert b"//" not in path
    assert b"\\" not in path
    assert not any(seg in (b".", b"..") for seg in path.split(b"/"))
    assert normalise(out) == out  # normalising twice changes nothing
    assert out.split(b"?", 1)[1:] == target.split(b"?", 1)[1:]  # the query untouched


def test_needs_normalising_is_false_only_where_nothing_would_change() -> None:
    for t in (b"/", b"/index.html", b"/a/b?c=d", b"/a.b/c-d_e~f"):
        assert not needs_normalising(t)
        assert normalise(t) == t
    for t in (b"//a", b"/a/./b", b"/%41", b"/a\\b", b"/.."):
        assert needs_normalising(t)


# -- the config keys ---------------------------------------------------------------------------


def test_path_rules_are_read_from_entrypoints_and_static_ports() -> None:
    from edgelb.ops.config import ConfigError, parse_config
    from watchers.model import PathRules

    c = parse_config(
        "entrypoints:\n"
        "  web: {listen: 127.0.0.1:8080}\n"
        "  reg: {listen: 127.0.0.1:5000, encoded_slashes: keep, merge_slashes: false}\n"
        "services:\n"
        "  - {name: raw, listen: 127.0.0.1:9000, encoded_slashes: keep, backends: []}\n")
    eps = {e.name: e.path_rules for e in c.entrypoints}
    assert eps == {"web": PathRules(), "reg": PathRules(False, "keep")}
    assert c.snapshot.services[0].path_rules == PathRules(True, "keep")
    for text, path in [
        ("entrypoints: {web: {listen: 8080, encoded_slashes: decode}}",
         "entrypoints.web.encoded_slashes"),
        ("entrypoints: {web: {listen: 8080, merge_slashes: maybe}}",
         "entrypoints.web.merge_slashes"),
        ("services: [{name: s, paths: [/], merge_slashes: false, backends: []}]",
         "services[0].merge_slashes"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(text + "\n")
        assert any(e.startswith(path + ": ") for e in info.value.errors), info.value.errors


def test_check_says_where_paths_are_passed_on_raw() -> None:
    from edgelb.ops.config import parse_config, summarize

    text = summarize(parse_config(
        "entrypoints: {reg: {listen: 127.0.0.1:5000, encoded_slashes: keep, "
        "merge_slashes: false}, web: {listen: 127.0.0.1:80}}\n"))
    assert "entrypoint reg: 127.0.0.1:5000, %2F and %5C passed on encoded, // kept" in text
    assert "entrypoint web: 127.0.0.1:80\n" in text + "\n"
