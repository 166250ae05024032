"""A small authoritative DNS server for the tests: real DNS wire format over UDP and TCP on
127.0.0.1, in the test's event loop.

Records are set per name (`set(name, type, [(ttl, rdata text), ...])`); the answers carry
their TTLs, SRV answers carry the targets' A/AAAA records in the additional section when the
server knows them (`additional=False` leaves it empty, so the client must ask). A UDP answer
bigger than `udp_limit` bytes is sent truncated (TC, no records), so the client retries over
TCP. Per name (or for every name) the server can answer SERVFAIL or NXDOMAIN, stay silent
(`drop`), or send bytes that are not a DNS message (`malformed`). Names it does not know get
NXDOMAIN; a known name without records of the asked type gets an empty answer (NODATA).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MODES = ("answer", "servfail", "nxdomain", "drop", "malformed")


@dataclass
class Stats:
    udp: int = 0
    tcp: int = 0
    truncated: int = 0
    questions: list[tuple[str, str]] = field(default_factory=list)  # (name, type), in order


class DnsServer:
    def __init__(self, udp_limit: int = 512) -> None:
        self.records: dict[tuple[str, str], list[tuple[int, str]]] = {}
        self.modes: dict[str, str] = {}  # name -> mode; "*" for every name
        self.additional = True
        self.udp_limit = udp_limit
        self.stats = Stats()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    # -- the zone ----------------------------------------------------------------------------

    def set(self, name: str, rdtype: str, records: list[tuple[int, str]]) -> None:
        """Replace the records of `name` of type `rdtype` (e.g. "SRV", [(5, "0 10 80 a.x.")])."""
        self.records[(_norm(name), rdtype.upper())] = list(records)

    def remove(self, name: str) -> None:
        name = _norm(name)
        for key in [k for k in self.records if k[0] == name]:
            del self.records[key]

    def mode(self, name: str, mode: str) -> None:
        """How to answer `name` ("*": every name): one of MODES."""
        assert mode in MODES, mode
        self.modes[name if name == "*" else _norm(name)] = mode

    # -- serving -----------------------------------------------------------------------------

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        # the same port for both: bind TCP first on an ephemeral port, then UDP on it
        for _ in range(20):
            self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", 0)
            self.port = self._tcp.sockets[0].getsockname()[1]
            try:
                self._udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=("127.0.0.1", self.port))
                return self
            except OSError:
                self._tcp.close()
                await self._tcp.wait_closed()
        raise RuntimeError("no port free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, wire: bytes, tcp: bool) -> bytes | None:
        """The bytes to send back for the query `wire` (None: stay silent)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        name = _norm(q.name.to_text())
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.stats.questions.append((name, rdtype))
        mode = self.modes.get(name, self.modes.get("*", "answer"))
        if mode == "drop":
            return None
        if mode == "malformed":
            return wire[:2] + b"\x81\x80\x00\x01\x00\x05garbage"  # counts that lie
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif mode == "nxdomain" or not any(k[0] == name for k in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            records = self.records.get((name, rdtype), [])
            for ttl, text in records:
                rrset = response.find_rrset(response.answer, q.name, dns.rdataclass.IN,
                                            q.rdtype, create=True)
                rrset.add(_rdata(q.rdtype, text), ttl)
            if rdtype == "SRV" and self.additional:
                self._add_targets(response, records)
        out = response.to_wire(max_size=65535)
        if not tcp and len(out) > self.udp_limit:
            self.stats.truncated += 1
            short = dns.message.make_response(query)
            short.flags |= dns.flags.AA | dns.flags.TC
            out = short.to_wire()
        return out

    def _add_targets(self, response: dns.message.Message, records: list[tuple[int, str]]
                     ) -> None:
        for _, text in records:
            target = _norm(text.split()[-1])
            for rdtype in ("A", "AAAA"):
                for ttl, addr in self.records.get((target, rdtype), []):
                    rrset = response.find_rrset(
                        response.additional, dns.name.from_text(target), dns.rdataclass.IN,
                        dns.rdatatype.from_text(rdtype), create=True)
                    rrset.add(_rdata(dns.rdatatype.from_text(rdtype), addr), ttl)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", head)[0])
                self.stats.tcp += 1
                out = self.answer(wire, tcp=True)
                if out is None:
                    continue
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.stats.udp += 1
        out = self.server.answer(data, tcp=False)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _rdata(rdtype: int, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)
