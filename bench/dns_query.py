"""What one DNS lookup costs the loop: dnspython's asyncio resolver, dnspython's asyncio query
(what watchers/dns/resolver.py uses) and a minimal own query over an asyncio datagram endpoint,
against tests/dns_server.py on 127.0.0.1 (in the same loop: its cost is in every figure).

    .venv/bin/python bench/dns_query.py [queries]
"""

from __future__ import annotations

import asyncio
import random
import struct
import sys
import time
from pathlib import Path

import dns.asyncquery
import dns.asyncresolver
import dns.message
import dns.rdatatype
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dns_server import DnsServer

NAME = "web.bench.test."


def encode_query(qid: int, name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(
        "!HH", qtype, 1)


def parse_a(wire: bytes) -> list[str]:
    """Addresses of the A records of a response (minimal: assumes one question)."""
    qd, an = struct.unpack("!HH", wire[4:8])
    pos = 12
    for _ in range(qd):
        while wire[pos]:
            pos += wire[pos] + 1
        pos += 5
    out = []
    for _ in range(an):
        if wire[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while wire[pos]:
                pos += wire[pos] + 1
            pos += 1
        rtype, _, _, rdlen = struct.unpack("!HHIH", wire[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            out.append(".".join(str(b) for b in wire[pos:pos + 4]))
        pos += rdlen
    return out


class _Own(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytes]] = {}

    def datagram_received(self, data: bytes, addr) -> None:
        fut = self.waiting.pop(struct.unpack("!H", data[:2])[0], None)
        if fut is not None and not fut.done():
            fut.set_result(data)


async def main(n: int) -> None:
    server = await DnsServer().start()
    server.set(NAME, "A", [(30, "10.0.0.1"), (30, "10.0.0.2")])
    loop = asyncio.get_running_loop()

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    async def with_resolver() -> None:
        answer = await resolver.resolve(NAME, "A", search=False)
        assert len(answer) == 2

    async def with_query() -> None:
        q = dns.message.make_query(NAME, dns.rdatatype.A)
        r, _ = await dns.asyncquery.udp_with_fallback(q, "127.0.0.1", timeout=1, port=server.port)
        assert len(r.answer[0]) == 2

    transport, own = await loop.create_datagram_endpoint(
        _Own, remote_addr=("127.0.0.1", server.port))

    async def with_own() -> None:
        qid = random.getrandbits(16)
        fut = own.waiting[qid] = loop.create_future()
        transport.sendto(encode_query(qid, NAME))
        wire = await asyncio.wait_for(fut, 1)
        assert len(parse_a(wire)) == 2

    for label, fn in (("dns.asyncresolver.Resolver.resolve", with_resolver),
                      ("dns.asyncquery.udp_with_fallback", with_query),
                      ("own datagram endpoint + parser", with_own)):
        for _ in range(50):
            await fn()  # warm up
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            await fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"{label:38s} {wall / n * 1e6:7.1f} us/query wall, {cpu / n * 1e6:7.1f} us CPU "
              "(server included)")
    transport.close()
    await server.stop()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
