"""The HTTP data path's Exchange states and its accounting, driven without sockets: the client
and upstream protocols get fake transports (as bench/micro_http.py does) and a clock the test
moves, so each step of one request can be looked at."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from balancers.ewma import peak_ewma
from edgelb.http.client import ClientProtocol
from edgelb.http.exchange import DONE, RECEIVING_HEAD, SENT, WAITING_TURN
from edgelb.http.listener import HttpListener
from edgelb.http.upstream import UpstreamProtocol
from edgelb.pool import ServiceState
from watchers.model import Address, Backend, Service

GET = b"GET /a HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, parts) -> None:
        self.out.append(b"".join(parts))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """One client connection and one kept-alive upstream connection to the only backend."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.loop.time = self.clock  # type: ignore[method-assign]
        self.service = ServiceState(Service("web", backends=(Backend("127.0.0.1", 1),)))
        self.backend = self.service.pool.backends[0]
        listener = HttpListener(Address("127.0.0.1", 8080), service=self.service, loop=self.loop)
        self.client = ClientProtocol(listener)
        self.client_out = FakeTransport()
        self.client.connection_made(self.client_out)
        self.up = UpstreamProtocol(self.backend, self.service, listener)
        self.up_out = FakeTransport()
        self.up.connection_made(self.up_out)
        self.up.park()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.loop.close()


def test_an_exchange_goes_from_its_head_to_a_backend_and_is_done_with_its_response(
    rig: Rig,
) -> None:
    rig.client.data_received(GET[:10])
    ex = rig.client.parsing
    assert ex is not None and ex.state == RECEIVING_HEAD
    rig.client.data_received(GET[10:])
    assert rig.client.active is ex and ex.state == SENT and ex.upstream is rig.up
    assert rig.backend.inflight == 1 and not rig.backend.idle
    assert rig.up_out.out[0].startswith(b"GET /a HTTP/1.1\r\n")
    rig.up.data_received(OK)
    assert ex.state == DONE and rig.client.active is None
    assert b"".join(rig.client_out.out).endswith(b"\r\n\r\nok")
    assert rig.backend.inflight == 0 and rig.backend.idle == [rig.up]  # parked for reuse


def test_a_pipelined_request_waits_its_turn_then_takes_the_same_connection(rig: Rig) -> None:
    rig.client.data_received(GET + GET)
    first = rig.client.active
    pipeline = rig.client.pipeline
    assert first is not None and first.state == SENT
    assert pipeline is not None and len(pipeline) == 1
    second = pipeline[0]
    assert second.state == WAITING_TURN and second.upstream is None
    rig.up.data_received(OK)
    assert first.state == DONE
    assert rig.client.active is second and second.state == SENT and second.upstream is rig.up
    rig.up.data_received(OK)
    assert second.state == DONE and rig.backend.responses[200] == 2


def test_the_latency_estimate_is_balancers_peak_ewma_of_the_backends_time(rig: Rig) -> None:
    """One formula: the data path's estimate is balancers.ewma.peak_ewma of each response's
    time, whatever the gap between samples."""
    expected = 0.0
    last = 0.0
    for took, gap in ((0.2, 0.0), (0.05, 0.03), (0.01, 5.0), (0.3, 1.0)):
        rig.clock.now += gap
        rig.client.data_received(GET)
        rig.clock.now += took
        rig.up.data_received(OK)
        expected = peak_ewma(expected, last, took, rig.clock.now)
        last = rig.clock.now
        assert rig.backend.latency == pytest.approx(expected, rel=1e-9)
        assert rig.backend.latency_t == last
    assert rig.service.duration_sum == pytest.approx(0.2 + 0.05 + 0.01 + 0.3)
