"""One DNS lookup of a service's records, asynchronous, with resolv.conf's retry semantics.

Every question goes to the nameservers in order, `timeout` seconds each, for `attempts` rounds,
over UDP with a retry over TCP when the answer comes back truncated (dnspython's
`dns.asyncquery.udp_with_fallback`; the messages are dnspython's too). The first answer that
settles the question wins: NOERROR (records or none) or NXDOMAIN; SERVFAIL, REFUSED, a timeout
or bytes that are not a DNS message make it ask the next server. Names are absolute: no search
domains, no ndots.

A lookup ends in one of three values, never an exception: `Answer` (the targets, with the
smallest TTL of the records that made them), `NoRecords` (NXDOMAIN, or no records: the name is
decidedly empty) or `Failure` (nothing settled it: the last good backends keep serving).
SRV targets are resolved through the answer's additional section when it holds their
addresses, else with A and AAAA questions of their own; a target that does not exist adds no
address, a target whose question failed fails the whole lookup (so a flaky server never shrinks
a pool).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from watchers.dns.settings import ResolverSettings
from watchers.model import DnsQuery
from watchers.values import is_ip

EDNS_PAYLOAD = 1232  # the UDP size DNS flag day 2020 recommends
MAX_TARGETS = 256  # SRV targets resolved per lookup; the rest are left out


@dataclass(frozen=True, slots=True)
class Target:
    """An address a service answers on, with its SRV priority and weight (0, 1 for A/AAAA)."""

    host: str
    port: int
    priority: int = 0
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Answer:
    targets: tuple[Target, ...]
    ttl: float  # the smallest TTL of the records that made the targets


@dataclass(frozen=True, slots=True)
class NoRecords:
    kind: str  # nxdomain | empty


@dataclass(frozen=True, slots=True)
class Failure:
    kind: str  # timeout | servfail | refused | malformed | network | rcode N
    detail: str = ""


Result = Answer | NoRecords | Failure


class Resolver:
    """Asks `settings.nameservers` (which must not be empty) for a DnsQuery's records."""

    def __init__(self, settings: ResolverSettings) -> None:
        self.settings = settings

    async def lookup(self, query: DnsQuery) -> Result:
        if query.srv:
            return await self._srv(query.srv)
        return await self._addresses(query.name, query.port)

    # -- one question ---------------------------------------------------------------------------

    async def ask(self, name: str, rdtype: dns.rdatatype.RdataType
                  ) -> dns.message.Message | NoRecords | Failure:
        """The NOERROR response to (name, rdtype), or NXDOMAIN, or why no server settled it."""
        s = self.settings
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return Failure("malformed", f"{name!r} is not a DNS name: {e}")
        failure = Failure("timeout", "no nameserver")
        for _ in range(max(1, s.attempts)):
            for host, port in s.nameservers:
                query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
                try:
                    response, _tcp = await asyncio.wait_for(
                        dns.asyncquery.udp_with_fallback(query, host, timeout=s.timeout,
                                                         port=port),
                        2 * s.timeout + 0.1)  # UDP, then TCP when truncated
                except (TimeoutError, dns.exception.Timeout):
                    failure = Failure("timeout", f"{host}:{port} did not answer in "
                                      f"{s.timeout:g}s")
                    continue
                except (dns.exception.DNSException, ValueError, EOFError) as e:
                    failure = Failure("malformed", f"{host}:{port}: {type(e).__name__}: {e}")
                    continue
                except OSError as e:
                    failure = Failure("network", f"{host}:{port}: {e.strerror or e}")
                    continue
                rcode = response.rcode()
                if rcode == dns.rcode.NOERROR:
                    return response
                if rcode == dns.rcode.NXDOMAIN:
                    return NoRecords("nxdomain")
                kind = {dns.rcode.SERVFAIL: "servfail", dns.rcode.REFUSED: "refused"}.get(
                    rcode, f"rcode {dns.rcode.to_text(rcode)}")
                failure = Failure(kind, f"{host}:{port} answered {dns.rcode.to_text(rcode)}")
        return failure

    # -- A and AAAA -----------------------------------------------------------------------------

    async def _addresses(self, name: str, port: int, priority: int = 0, weight: int = 1
                         ) -> Result:
        if is_ip(name):
            return Answer((Target(name, port, priority, weight),), float("inf"))
        results = await asyncio.gather(self.ask(name, dns.rdatatype.A),
                                       self.ask(name, dns.rdatatype.AAAA))
        targets: list[Target] = []
        ttl = float("inf")
        kinds = []
        for rdtype, result in zip((dns.rdatatype.A, dns.rdatatype.AAAA), results, strict=True):
            if isinstance(result, Failure):
                return result
            if isinstance(result, NoRecords):
                kinds.append(result.kind)
                continue
            for rrset in _records(result, name, rdtype):
                ttl = min(ttl, rrset.ttl)
                targets += [Target(rd.address, port, priority, weight) for rd in rrset]
        if not targets:
            return NoRecords("nxdomain" if kinds == ["nxdomain", "nxdomain"] else "empty")
        return Answer(tuple(targets), ttl)

    # -- SRV ------------------------------------------------------------------------------------

    async def _srv(self, name: str) -> Result:
        response = await self.ask(name, dns.rdatatype.SRV)
        if not isinstance(response, dns.message.Message):
            return response
        records = [(rrset.ttl, rd) for rrset in _records(response, name, dns.rdatatype.SRV)
                   for rd in rrset]
        # a target of "." means: decidedly not offered at this name (RFC 2782)
        records = [(ttl, rd) for ttl, rd in records if rd.target != dns.name.root]
        if not records:
            return NoRecords("empty")
        ttl = float(min(t for t, _ in records))
        targets: list[Target] = []
        names = list(dict.fromkeys(rd.target.to_text() for _, rd in records))[:MAX_TARGETS]
        known = {n: _additional(response, n) for n in names}
        missing = [n for n in names if not known[n][0]]
        looked_up = await asyncio.gather(*(self._addresses(n, 0)
                                           for n in missing))
        for n, result in zip(missing, looked_up, strict=True):
            if isinstance(result, Failure):
                return Failure(result.kind, f"target {n}: {result.detail}")
            if isinstance(result, Answer):
                known[n] = ([t.host for t in result.targets], result.ttl)
        for record_ttl, rd in records:
            hosts, host_ttl = known.get(rd.target.to_text(), ([], float("inf")))
            for host in hosts:
                targets.append(Target(host, rd.port, rd.priority, rd.weight))
                ttl = min(ttl, record_ttl, host_ttl)
        if not targets:
            return NoRecords("empty")
        return Answer(tuple(targets), ttl)



def _records(response: dns.message.Message, name: str, rdtype: dns.rdatatype.RdataType
             ) -> list[dns.rrset.RRset]:
    """The answer's rrsets of `rdtype` for `name`, following a CNAME chain in the answer."""
    want = dns.name.from_text(name)
    out: list[dns.rrset.RRset] = []
    for _ in range(8):  # a CNAME chain longer than this is not followed
        cname = None
        for rrset in response.answer:
            if rrset.name != want or rrset.rdclass != dns.rdataclass.IN:
                continue
            if rrset.rdtype == rdtype:
                out.append(rrset)
            elif rrset.rdtype == dns.rdatatype.CNAME and len(rrset):
                cname = rrset[0].target
        if out or cname is None:
            break
        want = cname
    return out


def _additional(response: dns.message.Message, target: str) -> tuple[list[str], float]:
    """The addresses of `target` in the additional section, and their smallest TTL."""
    want = dns.name.from_text(target)
    hosts: list[str] = []
    ttl = float("inf")
    for rrset in response.additional:
        if rrset.name == want and rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            hosts += [rd.address for rd in rrset]
            ttl = min(ttl, rrset.ttl)
    return hosts, ttl
