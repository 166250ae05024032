"""Access control: source-address filters and basic auth (edgelb.net.acl)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import io
import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelb.net import acl
from edgelb.net.acl import (
    AUTH_BUSY,
    AUTH_CACHED,
    AUTH_FAILED,
    AUTH_MISSING,
    AUTH_OK,
    AUTH_PENDING,
    AUTH_THROTTLED,
    Credentials,
    SourceFilter,
    apr1_hash,
    challenge,
    parse_auth,
    parse_basic,
    parse_cidrs,
    parse_source_filter,
    scrypt_hash,
    sha_crypt,
)

# ---------------------------------------------------------------------------------------------
# Source filters

TABLE = [
    # (allow, deny, address, permitted)
    ([], [], "203.0.113.9", True),
    (["10.0.0.0/8"], [], "10.255.255.255", True),
    (["10.0.0.0/8"], [], "11.0.0.0", False),
    (["10.0.0.0/8"], [], "9.255.255.255", False),
    (["192.168.1.7"], [], "192.168.1.7", True),  # a bare address is a /32
    (["192.168.1.7"], [], "192.168.1.8", False),
    (["10.1.2.3/8"], [], "10.9.9.9", True),  # host bits set: the /8 it names
    (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.0.1", False),  # deny wins over allow
    (["10.0.0.0/8"], ["10.1.0.0/16"], "10.2.0.1", True),
    ([], ["10.1.0.0/16"], "10.1.0.1", False),  # deny only: everyone else is allowed
    ([], ["10.1.0.0/16"], "8.8.8.8", True),
    (["0.0.0.0/0"], ["10.0.0.0/8"], "10.0.0.1", False),
    (["2001:db8::/32"], [], "2001:db8:ffff::1", True),
    (["2001:db8::/32"], [], "2001:db9::1", False),
    (["::1"], [], "::1", True),  # /128
    (["::1"], [], "::2", False),
    (["::/0"], ["2001:db8::/48"], "2001:db8:0:1::", False),
    (["10.0.0.0/8"], [], "::ffff:10.0.0.1", True),  # IPv4-mapped is IPv4
    (["10.0.0.0/8"], [], "::ffff:11.0.0.1", False),
    ([], ["10.0.0.0/8"], "::ffff:10.0.0.1", False),
    (["::ffff:10.0.0.0/104"], [], "10.3.3.3", True),  # a mapped network is an IPv4 one
    (["::ffff:10.0.0.0/104"], [], "::ffff:10.3.3.3", True),
    (["10.0.0.0/8"], [], "::a00:1", False),  # IPv4-compatible is not IPv4-mapped
    (["::/0"], [], "10.0.0.1", False),  # families do not mix
    (["0.0.0.0/0"], [], "::1", False),
    (["fe80::/10"], [], "fe80::1%eth0", True),  # a zone id does not change the address
    (["10.0.0.0/8"], [], "not-an-ip", False),  # unparseable: refused by an active filter
    ([], ["10.0.0.0/8"], "", False),
    ([], [], "not-an-ip", True),  # no filter at all
    (["10.0.0.0/8", "10.0.0.0/16", "172.16.0.0/12"], [], "172.31.255.255", True),  # overlaps
]


@pytest.mark.parametrize(("allow", "deny", "address", "permitted"), TABLE)
def test_matching_table(allow, deny, address, permitted):
    f = SourceFilter(allow, deny)
    assert f.permits(address) is permitted
    assert f.permits(address.encode()) is permitted  # bytes are the same text
    assert f.permits(address) is permitted  # and again from the cache


def test_a_cached_decision_is_cheap():
    f = SourceFilter(["10.0.0.0/8", "2001:db8::/32"], ["10.1.0.0/16"])
    assert f.permits("10.0.0.1")
    start = time.perf_counter()
    for _ in range(100_000):
        f.permits("10.0.0.1")
    assert time.perf_counter() - start < 1.0  # about 0.1 us each; 10 us would be a regression


def test_no_lists_is_inactive_and_allows_everything():
    f = SourceFilter()
    assert not f.active
    assert f.permits("1.2.3.4") and f.permits(b"::1")


def test_the_cache_is_bounded_and_keeps_answering_right():
    f = SourceFilter(["10.0.0.0/8"], [], cache_size=8)
    for i in range(50):
        assert f.permits(f"10.0.0.{i}") and not f.permits(f"11.0.0.{i}")
        assert len(f._cache) <= 8


def test_the_decision_is_cached_per_address(monkeypatch):
    f = SourceFilter(["10.0.0.0/8"])
    calls = []
    real = SourceFilter._decide
    monkeypatch.setattr(SourceFilter, "_decide",
                        lambda self, ip: calls.append(ip) or real(self, ip))
    assert f.permits("10.0.0.1") and f.permits("10.0.0.1") and f.permits("10.0.0.1")
    assert calls == ["10.0.0.1"]


def test_filters_compare_by_what_they_match():
    assert SourceFilter(["10.0.0.0/8"]) == SourceFilter(["10.0.0.0/9", "10.128.0.0/9"])
    assert hash(SourceFilter(["::ffff:10.0.0.0/104"])) == hash(SourceFilter(["10.0.0.0/8"]))
    assert SourceFilter(["10.0.0.0/8"]) != SourceFilter([], ["10.0.0.0/8"])


def test_parse_cidrs_accepts_lists_and_marathon_strings():
    nets, errors = parse_cidrs("10.1.40.0/24 10.1.55.43, 2001:db8::/32", "acl")
    assert errors == []
    assert [str(n) for n in nets] == ["10.1.40.0/24", "10.1.55.43/32", "2001:db8::/32"]
    nets, errors = parse_cidrs(["::ffff:192.168.0.0/112"], "acl")
    assert errors == [] and nets == [ipaddress.ip_network("192.168.0.0/16")]
    assert parse_cidrs(None, "acl") == ([], [])


def test_bad_cidrs_are_named_with_a_fix():
    nets, errors = parse_cidrs(["10.0.0.0/8", "10.0.0.0/33", "example.com", 7, ""], "s.allow")
    assert [str(n) for n in nets] == ["10.0.0.0/8"]
    assert len(errors) == 4
    assert errors[0].startswith("s.allow[1]: '10.0.0.0/33' is not an IP address or CIDR")
    assert errors[1].startswith("s.allow[2]: 'example.com'")
    assert errors[2].startswith("s.allow[3]: expected a CIDR string")
    assert errors[3].startswith("s.allow[4]: expected a CIDR string")
    assert all("10.0.0.0/8" in e for e in errors)  # each says how to write one
    assert "s.deny[4]" in parse_cidrs(["1.1.1.1"] * 4 + ["::1/129"], "s.deny")[1][0]
    _, errors = parse_cidrs({"a": 1}, "s.allow")
    assert errors and errors[0].startswith("s.allow: expected a list of CIDRs")
    with pytest.raises(ValueError, match=r"deny\[0\]: '300.1.1.1'"):
        SourceFilter([], ["300.1.1.1"])


def test_parse_source_filter_forms():
    f, errors = parse_source_filter({"allow": ["10.0.0.0/8"], "deny": "10.1.0.0/16"}, "s")
    assert errors == [] and f == SourceFilter(["10.0.0.0/8"], ["10.1.0.0/16"])
    f, errors = parse_source_filter("10.1.40.0/24 10.1.55.43", "labels.ACL")
    assert errors == [] and f.permits("10.1.55.43") and not f.permits("10.1.55.44")
    assert parse_source_filter(None, "s") == (None, [])
    assert parse_source_filter({"allow": []}, "s") == (None, [])
    f, errors = parse_source_filter({"alow": ["10.0.0.0/8"], "deny": ["x"]}, "s")
    assert f is None
    assert errors[0] == "s.alow: unknown key; valid keys: allow, deny"
    assert errors[1].startswith("s.deny[0]: 'x'")
    assert parse_source_filter(5, "s")[1][0].startswith("s: expected {allow:")


_V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
# Mapped and IPv4 addresses are common in the draws, so the mapping rule is exercised.
_ADDR = st.one_of(_V4, _V6, _V4.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")))


@st.composite
def _net(draw):
    addr = draw(st.one_of(_V4, _V6, st.sampled_from([ipaddress.IPv4Address("10.0.0.0")])))
    prefix = draw(st.integers(0, addr.max_prefixlen))
    return ipaddress.ip_network((int(addr), prefix), strict=False)


def _truth(allow, deny, text):
    addr = ipaddress.ip_address(text)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    nets = [_as_v4(n) for n in allow], [_as_v4(n) for n in deny]

    def hit(ns):
        return any(n.version == addr.version and addr in n for n in ns)

    return not hit(nets[1]) and (not allow or hit(nets[0]))


def _as_v4(n):
    mapped = ipaddress.ip_network("::ffff:0:0/96")
    if n.version == 6 and n.prefixlen >= 96 and n.subnet_of(mapped):
        return ipaddress.ip_network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
    return n


@settings(max_examples=300, deadline=None)
@given(st.lists(_net(), max_size=6), st.lists(_net(), max_size=4),
       st.lists(_ADDR, min_size=1, max_size=8))
def test_permits_equals_the_ipaddress_ground_truth(allow, deny, addrs):
    f = SourceFilter([str(n) for n in allow], [str(n) for n in deny])
    for a in addrs:
        # Probe the address and its neighbours across network edges too.
        for probe in (a, *(n.network_address for n in allow[:2]),
                      *(n.broadcast_address for n in deny[:2])):
            assert f.permits(str(probe)) == _truth(allow, deny, str(probe)), probe


# ---------------------------------------------------------------------------------------------
# SHA-crypt, against the vectors published with the algorithm's specification

SHA256_VECTORS = [
    ("$5$saltstring", "Hello world!",
     "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("$5$rounds=10000$saltstringsaltstring", "Hello world!",
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("$5$rounds=5000$toolongsaltstring", "This is just a test",
     "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    ("$5$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    ("$5$rounds=77777$short", "we have a short salt string but not a short password",
     "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/"),
    ("$5$rounds=123456$asaltof16chars..", "a short string",
     "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"),
    ("$5$rounds=10$roundstoolow", "the minimum number is still observed",
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
]
SHA512_VECTORS = [
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdF"
     "CoEOfaS35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8"
     "vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1"
     "yxdYcz/e1JSbq3y6JMxxl8audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x"
     "9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    ("$6$rounds=77777$short", "we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxF"
     "mtlcGZelFl5CxtgfiAc0"),
    ("$6$rounds=123456$asaltof16chars..", "a short string",
     "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevo"
     "BK25fs2xXgMNrCzIMVcgEJAstJeonj1"),
    ("$6$rounds=10$roundstoolow", "the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTf"
     "F4ZEQpyUNGc0dqbpBYYBaHHrsX."),
]


@pytest.mark.parametrize(("setting", "password", "expected"), SHA256_VECTORS + SHA512_VECTORS)
def test_sha_crypt_published_vectors(setting, password, expected):
    assert sha_crypt(password, setting) == expected


FAST_VECTORS = [v for v in SHA256_VECTORS + SHA512_VECTORS if "7777" not in v[0]
                and "123456" not in v[0]]  # the slow ones are covered by the test above


@pytest.mark.parametrize(("setting", "password", "expected"), FAST_VECTORS)
def test_published_hashes_verify_as_credentials(setting, password, expected):
    c = Credentials("r", [f"u:{expected}"])
    assert c.check(_basic("u", password)) == "u"
    assert c.check(_basic("u", password + "x")) is None


def test_long_and_empty_passwords_and_salts():
    # Lengths across the digest size take the other branches of the byte-sequence steps.
    for n in (0, 1, 31, 32, 33, 63, 64, 65, 200):
        for setting in ("$5$", "$6$abcdefghijklmnop"):
            h = sha_crypt("p" * n, setting)
            c_hash = h.rsplit("$", 1)[1]
            assert len(c_hash) == (43 if setting.startswith("$5$") else 86)
    assert sha_crypt("x", "$6$$") == sha_crypt("x", "$6$")


# ---------------------------------------------------------------------------------------------
# Basic auth

ALICE = SHA512_VECTORS[0][2]  # "Hello world!"
BOB = SHA256_VECTORS[0][2]  # "Hello world!"


def _basic(user: str, password: str, scheme: str = "Basic") -> bytes:
    return f"{scheme} ".encode() + base64.b64encode(f"{user}:{password}".encode())


def test_scrypt_round_trip():
    h = scrypt_hash("s3cret", n=1024, r=8, p=1)
    assert h.startswith("scrypt$1024$8$1$")
    c = Credentials("shop", [f"carol:{h}"])
    assert c.check(_basic("carol", "s3cret")) == "carol"
    assert c.check(_basic("carol", "s3cre")) is None
    assert c.check(_basic("carol", "s3cret")) == "carol"


def test_the_advertised_scrypt_one_liner_makes_a_hash_that_verifies(monkeypatch):
    code = acl.SCRYPT_ONE_LINER.split("'", 1)[1].rsplit("'", 1)[0]
    monkeypatch.setattr(getpass, "getpass", lambda prompt="Password: ": "from the shell")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    stored = out.getvalue().strip()
    c, errors = parse_auth({"users": [f"dave:{stored}"]}, "auth")
    assert errors == []
    assert c.check(_basic("dave", "from the shell")) == "dave"


@pytest.mark.parametrize(("header", "why"), [
    (b"Bearer " + base64.b64encode(b"alice:Hello world!"), "wrong scheme"),
    (b"Basic", "no credentials"),
    (b"Basic    ", "blank credentials"),
    (b"Basic not*base64!", "bad base64"),
    (b"Basic " + base64.b64encode(b"aliceHello world!"), "no colon"),
    (b"Basic " + base64.b64encode(b"alice:"), "empty password"),
    (b"Basic " + base64.b64encode(b":Hello world!"), "empty user"),
    (b"Basic " + base64.b64encode(b"\xff:Hello world!"), "user not UTF-8"),
    (b"Basic " + base64.b64encode(b"mallory:Hello world!"), "unknown user"),
    (b"Basic " + base64.b64encode(b"alice:hello world!"), "wrong password"),
    (b"Basic " + base64.b64encode(b"alice:" + b"x" * 5000), "too long"),
    (b"", "empty"),
])
def test_refused_headers(header, why):
    c = Credentials("shop", [f"alice:{ALICE}"])
    assert c.check(header) is None, why


@pytest.mark.parametrize("header", [
    _basic("alice", "Hello world!"),
    _basic("alice", "Hello world!", scheme="basic"),  # the scheme is case-insensitive
    _basic("alice", "Hello world!", scheme="BASIC"),
    b"  " + _basic("alice", "Hello world!") + b" \t",  # surrounding blanks
    b"Basic   " + base64.b64encode(b"alice:Hello world!"),  # several spaces
    _basic("alice", "Hello world!").rstrip(b"="),  # padding left out
    _basic("alice", "Hello world!").decode(),  # a str value
])
def test_accepted_headers(header):
    c = Credentials("shop", [f"alice:{ALICE}", f"bob:{BOB}"])
    assert c.check(header) == "alice"


def test_passwords_may_hold_colons_and_utf8():
    stored = sha_crypt("pä:ss:wörd", "$6$abc")
    c = Credentials("r", [f"jörg:{stored}"])
    assert parse_basic(_basic("jörg", "pä:ss:wörd")) == ("jörg", "pä:ss:wörd".encode())
    assert c.check(_basic("jörg", "pä:ss:wörd")) == "jörg"


def test_a_second_check_does_not_hash_again():
    c = Credentials("shop", [f"alice:{ALICE}", f"bob:{BOB}"])
    h = _basic("bob", "Hello world!")
    assert c.cached(h) is None
    assert c.check(h) == "bob" and c.verifications == 1
    assert c.check(h) == "bob" and c.check(h) == "bob"
    assert c.verifications == 1
    assert c.cached(h) == "bob"


class Clock:
    """A hand-moved clock for Credentials(clock=...)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_is_remembered_briefly_and_then_hashed_again():
    clock = Clock()
    c = Credentials("shop", [f"alice:{ALICE}"], clock=clock)
    wrong = _basic("alice", "guess")
    assert c.check(wrong) is None and c.verifications == 1
    for _ in range(3):  # the same wrong value again: refused without a hash
        assert c.check(wrong) is None
    assert c.verifications == 1 and c.cached(wrong) is None
    clock.now += acl.NEGATIVE_TTL
    assert c.check(wrong) is None and c.verifications == 2
    # an unknown user costs a hash too, so its answer takes as long as a wrong password's
    assert c.check(_basic("mallory", "guess")) is None and c.verifications == 3
    # refused before any hashing: bad format, empty password
    assert c.check(b"Basic !!") is None and c.check(_basic("alice", "")) is None
    assert c.verifications == 3


def test_a_verified_value_is_let_through_for_cache_ttl_then_hashed_again():
    clock = Clock()
    c = Credentials("shop", [f"alice:{ALICE}"], cache_ttl=60, clock=clock)
    h = _basic("alice", "Hello world!")
    assert c.check(h) == "alice" and c.verifications == 1
    clock.now += 59.9
    assert c.cached(h) == "alice" and c.check(h) == "alice" and c.verifications == 1
    clock.now += 0.1
    assert c.cached(h) is None
    assert c.check(h) == "alice" and c.verifications == 2


def test_cache_ttl_0_hashes_every_time():
    c = Credentials("shop", [f"alice:{ALICE}"], cache_ttl=0)
    for n in range(1, 3):
        assert c.check(_basic("alice", "Hello world!")) == "alice"
        assert c.check(_basic("alice", "x")) is None
        assert c.verifications == 2 * n


def test_the_caches_are_bounded():
    c = Credentials("shop", [f"alice:{ALICE}"], cache_size=2)
    headers = [_basic("alice", "Hello world!", scheme=s) for s in ("Basic", "basic", "BASIC")]
    for h in headers:
        assert c.check(h) == "alice"
        assert len(c.state.good) <= 2
    assert c.cached(headers[-1]) == "alice" and c.cached(headers[0]) is None  # oldest went
    for i in range(5):
        assert c.check(_basic("alice", f"wrong{i}")) is None
        assert len(c.state.bad) <= 2


def test_challenge_line():
    assert challenge("shop") == b'www-authenticate: Basic realm="shop", charset="UTF-8"\r\n'
    assert challenge('a "b" \\c') == (
        b'www-authenticate: Basic realm="a \\"b\\" \\\\c", charset="UTF-8"\r\n')
    assert Credentials("shop", [f"alice:{ALICE}"]).challenge_header == challenge("shop")


# ---------------------------------------------------------------------------------------------
# parse_auth


def test_parse_auth_mapping_and_marathon_string():
    c, errors = parse_auth({"realm": "shop", "users": [f"alice:{ALICE}", f"bob:{BOB}"]},
                           "services[0].auth")
    assert errors == [] and c.realm == "shop" and c.users == ("alice", "bob")
    assert c.check(_basic("bob", "Hello world!")) == "bob"
    c, errors = parse_auth({"users": [f"alice:{ALICE}"]}, "a")
    assert errors == [] and c.realm == acl.DEFAULT_REALM
    c, errors = parse_auth(f"shop:alice:{ALICE}", "labels.HAPROXY_0_AUTH")
    assert errors == [] and c.realm == "shop" and c.users == ("alice",)
    assert c == Credentials("shop", [f"alice:{ALICE}"])
    assert parse_auth(None, "a") == (None, [])


def test_plain_text_passwords_are_refused_with_how_to_hash():
    c, errors = parse_auth({"users": ["alice:hunter2"]}, "services[0].auth")
    assert c is None and len(errors) == 1
    e = errors[0]
    assert e.startswith("services[0].auth.users[0] (user 'alice'): this looks like a plain-text")
    assert "mkpasswd -m sha-512" in e and "hashlib.scrypt" in e
    assert "hunter2" not in e  # an error never repeats a password
    c, errors = parse_auth("shop:alice:hunter2", "labels.HAPROXY_0_AUTH")
    assert c is None and errors[0].startswith("labels.HAPROXY_0_AUTH (user 'alice'): this looks")
    assert "hunter2" not in errors[0]


@pytest.mark.parametrize(("value", "expected"), [
    ({"users": [f"alice:{ALICE}"], "relm": "x"},
     "a.relm: unknown key; valid keys: realm, users, cache_ttl, max_failures, failure_window"),
    ({"realm": "shop"}, "a: missing users"),
    ({"users": []}, "a.users: list at least one"),
    ({"users": "alice:x"}, "a.users: expected a list"),
    ({"users": [7]}, "a.users[0]: expected a \"user:HASH\" string, got int"),
    ({"users": ["alice"]}, "a.users[0]: expected \"user:HASH\""),
    ({"users": [f":{ALICE}"]}, "a.users[0]: the user name must be non-empty"),
    ({"users": [f"alice:{ALICE}", f"alice:{BOB}"]}, "a.users[1]: user 'alice' is listed twice"),
    ({"realm": "", "users": [f"alice:{ALICE}"]}, "a.realm: expected a non-empty printable"),
    ({"realm": "a\nb", "users": [f"alice:{ALICE}"]}, "a.realm: expected a non-empty printable"),
    ({"users": ["alice:$1$abc$def"]}, "MD5-crypt hashes ($1$...) are not supported"),
    ({"users": ["alice:$2y$10$abcdefghijklmnopqrstuv"]}, "a bcrypt hash has the form"),
    ({"users": ["alice:$2x$05$" + "a" * 53]}, "bcrypt hashes of this variant ($2x$...)"),
    ({"users": ["alice:$2y$13$" + "a" * 53]}, "bcrypt cost 13 is too slow"),
    ({"users": ["alice:$2y$03$" + "a" * 53]}, "bcrypt cost 3 is outside 4..31"),
    ({"users": ["alice:$apr1$abc$tooshort"]}, "an apr1 hash has the form"),
    ({"users": ["alice:$apr1$toolongsalt$" + "a" * 22]}, "an apr1 hash has the form"),
    ({"users": ["alice:{SHA}EfatjsUqKYSrqv18O1FlA3hcIHI="]}, "htpasswd SHA-1 (htpasswd -s)"),
    ({"users": ["alice:Hveoka2frDcvk"]}, "DES crypt hash (htpasswd -d"),
    ({"users": [f"alice:{ALICE}"], "cache_ttl": "soon"}, "a.cache_ttl: "),
    ({"users": [f"alice:{ALICE}"], "cache_ttl": "2d"}, "a.cache_ttl: at most 1d"),
    ({"users": [f"alice:{ALICE}"], "failure_window": 0}, "a.failure_window: must be above 0"),
    ({"users": [f"alice:{ALICE}"], "max_failures": -1}, "a.max_failures: expected a whole"),
    ({"users": [f"alice:{ALICE}"], "max_failures": True}, "a.max_failures: expected a whole"),
    ({"users": ["alice:$y$j9T$abc$def"]}, "yescrypt hashes"),
    ({"users": ["alice:$9$abc"]}, "unknown hash scheme"),
    ({"users": [f"alice:{ALICE[:-1]}"]}, "must be 86 characters"),
    ({"users": [f"alice:{BOB}x"]}, "must be 43 characters"),
    ({"users": ["alice:$6$saltonly"]}, "a SHA-crypt hash has the form"),
    ({"users": ["alice:$6$rounds=999999$abc$" + "a" * 86]}, "too slow to verify"),
    ({"users": ["alice:$6$rounds=10$abc$" + "a" * 86]}, "rounds=10 is outside"),
    ({"users": ["alice:scrypt$1$8$1$YWJj$YWJj"]}, "N a power of 2"),
    ({"users": ["alice:scrypt$16384$8$1$YWJj"]}, "a scrypt hash has the form"),
    ({"users": ["alice:scrypt$x$8$1$YWJj$YWJj"]}, "must be integers"),
    ({"users": ["alice:scrypt$16384$8$1$YWJj$YWJj"]}, "at least 16 bytes"),
    ({"users": ["alice:scrypt$16384$8$1$!!$" + "A" * 44]}, "must be base64"),
    ({"users": ["alice:scrypt$1048576$8$1$YWJj$" + "A" * 44]}, "too much memory"),
    ("shop:alice", "a: expected realm:user:HASH"),
    (["x"], "a: expected {realm: NAME"),
])
def test_parse_auth_errors_name_the_item(value, expected):
    c, errors = parse_auth(value, "a")
    assert c is None
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("a") for e in errors)


def test_credentials_constructor_refuses_bad_entries():
    with pytest.raises(ValueError, match=r"users\[0\] \(user 'alice'\): this looks like a plain"):
        Credentials("shop", ["alice:hunter2"])
    with pytest.raises(ValueError, match="realm"):
        Credentials("", [f"alice:{ALICE}"])


# ---------------------------------------------------------------------------------------------
# htpasswd hashes: apr1 and bcrypt

# made with `openssl passwd -apr1 -salt SALT PASSWORD` and `htpasswd -nbm` (Apache 2.4)
APR1_VECTORS = [
    ("saltsalt", "password", "$apr1$saltsalt$yAAkm4libquA.ZWLHbSBq/"),
    ("abc", "Hello world!", "$apr1$abc$T9e3aXgBW7UTQ.tuLuiz.1"),
    ("12345678", "", "$apr1$12345678$sHuPAw7VA9xjRbJz7zKV7/"),
    ("x", "a very long password that goes beyond sixteen bytes, surely, yes",
     "$apr1$x$h69zagr7RyP/s0/WkurKg0"),
    ("AaocIc/q", "Hello world!", "$apr1$AaocIc/q$FvHse91XUyk4rVL9m4nyQ0"),
]
# made with `htpasswd -nbB [-C cost] USER PASSWORD` (Apache 2.4): $2y$, cut at 72 bytes
BCRYPT_VECTORS = [
    ("Hello world!", "$2y$05$6.VsdPc354AvNACQS3mGdu9ZMT1gVAFO1t2xuK74tapMrxOERzDDe"),
    ("s3cret:with colon", "$2y$04$H3B66.T6liFpQBCETK8aaevgrKiDBwiwBmGnLdcetwwP951odgIfO"),
    ("p" * 80, "$2y$05$K4LboxdfWcnIDLP9om6H8OFh9aVSyQxoe/hwA0pRN01apn/dRrY/y"),
]


@pytest.mark.parametrize(("salt", "password", "expected"), APR1_VECTORS)
def test_apr1_matches_openssl_and_htpasswd(salt, password, expected):
    assert apr1_hash(password, salt) == expected
    c = Credentials("r", [f"u:{expected}"])
    # (an empty password never authenticates, whatever the hash says)
    assert c.check(_basic("u", password)) == ("u" if password else None)
    assert c.check(_basic("u", password + "x")) is None


@pytest.mark.parametrize(("password", "stored"), BCRYPT_VECTORS)
def test_htpasswd_bcrypt_hashes_verify(password, stored):
    c = Credentials("r", [f"u:{stored}"])
    assert c.check(_basic("u", password)) == "u"
    assert c.check(_basic("u", "x" + password[1:])) is None


def test_bcrypt_reads_72_bytes_like_htpasswd():
    c = Credentials("r", [f"u:{BCRYPT_VECTORS[2][1]}"])  # "p" * 80
    assert c.check(_basic("u", "p" * 72 + "anything")) == "u"
    assert c.check(_basic("u", "p" * 71)) is None


@pytest.mark.parametrize("prefix", [b"2a", b"2b"])
def test_bcrypt_2a_and_2b_from_the_bcrypt_package(prefix):
    import bcrypt

    stored = bcrypt.hashpw(b"Hello world!", bcrypt.gensalt(4, prefix=prefix)).decode()
    assert stored.startswith(f"${prefix.decode()}$04$")
    c = Credentials("r", [f"u:{stored}"])
    assert c.check(_basic("u", "Hello world!")) == "u"
    assert c.check(_basic("u", "Hello world?")) is None
    assert c.check(b"Basic " + base64.b64encode(b"u:Hello\0world!")) is None  # no exception


def test_apr1_is_accepted_with_a_warning_naming_the_entry():
    users = [f"alice:{ALICE}", f"carol:{APR1_VECTORS[4][2]}"]
    c, errors = parse_auth({"users": users}, "services[0].auth")
    assert errors == [] and c.weak == ("carol",)
    assert len(c.warnings) == 1
    w = c.warnings[0]
    assert w.startswith("services[0].auth.users[1] (user 'carol'): apr1")
    assert "weak" in w and "htpasswd -nB USER" in w
    c, errors = parse_auth(f"shop:carol:{APR1_VECTORS[4][2]}", "labels.HAPROXY_0_AUTH")
    assert errors == [] and c.warnings[0].startswith("labels.HAPROXY_0_AUTH (user 'carol')")
    c, errors = parse_auth({"users": [f"alice:{ALICE}"]}, "a")
    assert errors == [] and c.warnings == ()


def test_auth_options_are_parsed_and_part_of_equality():
    c, errors = parse_auth({"users": [f"alice:{ALICE}"], "cache_ttl": "1m",
                            "max_failures": 0, "failure_window": "30s"}, "a")
    assert errors == []
    assert (c.cache_ttl, c.max_failures, c.failure_window) == (60.0, 0, 30.0)
    d, _ = parse_auth({"users": [f"alice:{ALICE}"]}, "a")
    assert (d.cache_ttl, d.max_failures, d.failure_window) == (
        acl.CACHE_TTL, acl.MAX_FAILURES, acl.FAILURE_WINDOW)
    assert c != d and c.users_key == d.users_key


def test_a_reload_with_the_same_users_keeps_what_was_learnt():
    old = Credentials("shop", [f"alice:{ALICE}"])
    h = _basic("alice", "Hello world!")
    assert old.check(h) == "alice"
    same = Credentials("shop", [f"alice:{ALICE}"], cache_ttl=120)
    same.adopt(old)
    assert same.cached(h) == "alice"
    other = Credentials("shop", [f"alice:{ALICE}", f"bob:{BOB}"])
    other.adopt(old)
    assert other.cached(h) is None


def test_the_throttle_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4():
    key = acl._client_key
    assert key(b"2001:db8:1:2::1") == key("2001:db8:1:2:ffff::9") != key(b"2001:db8:1:3::1")
    assert key(b"::ffff:10.0.0.1") == key(b"10.0.0.1") == key("10.0.0.1") == b"10.0.0.1"
    assert key(b"fe80::1%eth0") == key(b"fe80::2")
    assert key(b"unknown") == b"unknown"


# ---------------------------------------------------------------------------------------------
# admit(): the data path's entry (a thread verifies; the verdict comes back on the loop)


class Verdicts:
    """Collects done(verdict) callbacks and lets a test await the next one."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.event = asyncio.Event()

    def __call__(self, verdict: int) -> None:
        self.got.append(verdict)
        self.event.set()

    async def wait(self, n: int) -> list[int]:
        while len(self.got) < n:
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), 5)
        return self.got


async def test_admit_verifies_in_a_thread_and_caches():
    loop = asyncio.get_running_loop()
    c = Credentials("shop", [f"alice:{ALICE}"])
    good = _basic("alice", "Hello world!")
    done = Verdicts()
    assert c.admit(None, b"10.0.0.1", loop, done) == AUTH_MISSING
    assert c.admit(b"Bearer x", b"10.0.0.1", loop, done) == AUTH_MISSING
    assert c.admit(good, b"10.0.0.1", loop, done) == AUTH_PENDING
    assert c.admit(good, b"10.0.0.2", loop, done) == AUTH_PENDING  # joins the same hash
    assert await done.wait(2) == [AUTH_OK, AUTH_OK]
    assert c.verifications == 1 and acl.HASH_POOL.busy == 0
    assert c.admit(good, b"10.0.0.3", loop, done) == AUTH_CACHED


async def test_admit_throttles_an_address_after_max_failures_until_the_window_ends():
    loop = asyncio.get_running_loop()
    clock = Clock()
    c = Credentials("shop", [f"alice:{ALICE}"], max_failures=3, failure_window=10,
                    clock=clock)
    done = Verdicts()
    for i in range(3):
        assert c.admit(_basic("alice", f"guess{i}"), b"10.0.0.1", loop, done) == AUTH_PENDING
        # a 4th distinct guess while 3 hashes are pending is refused at once
        assert await done.wait(i + 1) == [AUTH_FAILED] * (i + 1)
    good = _basic("alice", "Hello world!")
    assert c.admit(good, b"10.0.0.1", loop, done) == AUTH_THROTTLED
    assert c.admit(_basic("alice", "guess9"), b"10.0.0.1", loop, done) == AUTH_THROTTLED
    assert c.retry_after(b"10.0.0.1") == 10
    clock.now += 4.2
    assert c.retry_after(b"10.0.0.1") == 6
    # another address is not throttled
    assert c.admit(good, b"10.0.0.2", loop, done) == AUTH_PENDING
    assert (await done.wait(4))[-1] == AUTH_OK
    # a verified value passes even from the throttled address (no hash, nothing to guess)
    assert c.admit(good, b"10.0.0.1", loop, done) == AUTH_CACHED
    clock.now += 5.8  # the window is over
    assert c.admit(_basic("alice", "guess3"), b"10.0.0.1", loop, done) == AUTH_PENDING
    assert (await done.wait(5))[-1] == AUTH_FAILED
    assert c.verifications == 5


async def test_pending_hashes_count_against_the_address():
    loop = asyncio.get_running_loop()
    c = Credentials("shop", [f"alice:{ALICE}"], max_failures=2)
    done = Verdicts()
    assert c.admit(_basic("alice", "a"), b"10.0.0.1", loop, done) == AUTH_PENDING
    assert c.admit(_basic("alice", "b"), b"10.0.0.1", loop, done) == AUTH_PENDING
    assert c.admit(_basic("alice", "c"), b"10.0.0.1", loop, done) == AUTH_THROTTLED
    assert c.retry_after(b"10.0.0.1") == 1
    assert await done.wait(2) == [AUTH_FAILED, AUTH_FAILED]
    assert c.verifications == 2


async def test_max_failures_0_turns_the_throttle_off():
    loop = asyncio.get_running_loop()
    c = Credentials("shop", [f"alice:{ALICE}"], max_failures=0)
    done = Verdicts()
    for i in range(6):
        assert c.admit(_basic("alice", f"g{i}"), b"10.0.0.1", loop, done) == AUTH_PENDING
    assert await done.wait(6) == [AUTH_FAILED] * 6
    assert c.state.clients == {}


async def test_a_full_hash_pool_answers_busy_at_once(monkeypatch):
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(acl.HASH_POOL, "limit", 1)
    c = Credentials("shop", [f"alice:{ALICE}"], max_failures=0)
    done = Verdicts()
    assert c.admit(_basic("alice", "a"), b"10.0.0.1", loop, done) == AUTH_PENDING
    assert c.admit(_basic("alice", "b"), b"10.0.0.2", loop, done) == AUTH_BUSY
    assert c.admit(_basic("alice", "a"), b"10.0.0.3", loop, done) == AUTH_PENDING  # joins
    assert await done.wait(2) == [AUTH_FAILED, AUTH_FAILED]
    assert acl.HASH_POOL.busy == 0
    assert c.admit(_basic("alice", "b"), b"10.0.0.2", loop, done) == AUTH_PENDING
    assert await done.wait(3) == [AUTH_FAILED] * 3


def test_the_failure_table_is_bounded(monkeypatch):
    monkeypatch.setattr(acl, "MAX_CLIENTS", 8)
    clock = Clock()
    c = Credentials("shop", [f"alice:{ALICE}"], clock=clock)
    for i in range(20):
        c._failed(f"10.0.0.{i}".encode(), clock.now)
        assert len(c.state.clients) <= 8
    assert b"10.0.0.19" in c.state.clients and b"10.0.0.0" not in c.state.clients
