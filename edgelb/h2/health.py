"""The gRPC health check (`health_check: {type: grpc}`): one `grpc.health.v1.Health/Check`
call over HTTP/2 on a connection the caller opened (h2c, or TLS that chose h2), the way
Kubernetes' grpc probes and grpc-health-probe ask. Healthy: grpc-status 0 and SERVING.

The two protobuf messages are a single field each, written and read here by hand (bounded,
never raising) rather than pulling protobuf into the proxy.
"""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import h2.exceptions

PATH = b"/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
MAX_ANSWER = 64 * 1024  # bytes of response data read at most


def check_request(service: str) -> bytes:
    """A length-prefixed HealthCheckRequest{service}."""
    name = service.encode()
    body = (b"\x0a" + _varint(len(name)) + name) if name else b""
    return b"\x00" + len(body).to_bytes(4, "big") + body


def serving_status(data: bytes) -> int | None:
    """The `status` field of a length-prefixed HealthCheckResponse, or None if malformed
    (a missing field is 0, UNKNOWN, as protobuf reads it)."""
    if len(data) < 5 or data[0] != 0:
        return None
    n = int.from_bytes(data[1:5], "big")
    msg = data[5 : 5 + n]
    if len(msg) != n:
        return None
    i = 0
    status = 0
    while i < len(msg):
        tag, i = _read_varint(msg, i)
        if tag is None:
            return None
        wire = tag & 7
        if wire == 0:
            value, i = _read_varint(msg, i)
            if value is None:
                return None
            if tag >> 3 == 1:
                status = value
        elif wire == 2:
            size, i = _read_varint(msg, i)
            if size is None or i + size > len(msg):
                return None
            i += size
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            return None
    return status if i == len(msg) else None


async def grpc_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      authority: str, service: str, scheme: str) -> tuple[bool, str]:
    """Make one Check call; (healthy, what was seen). Raises what the streams raise."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [
        (b":method", b"POST"), (b":scheme", scheme.encode()), (b":authority", authority.encode()),
        (b":path", PATH), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"user-agent", b"edgelb-health")])
    conn.send_data(sid, check_request(service), end_stream=True)
    writer.write(conn.data_to_send())
    fields: dict[bytes, bytes] = {}
    data = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return False, "connection closed before the answer"
        try:
            events = conn.receive_data(chunk)
        except h2.exceptions.ProtocolError as e:
            return False, f"not HTTP/2 ({type(e).__name__})"
        for ev in events:
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)) \
                    and ev.stream_id == sid:
                fields.update(ev.headers)
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                if len(data) < MAX_ANSWER:
                    data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                return False, f"stream reset (error {ev.error_code})"
            elif isinstance(ev, h2.events.ConnectionTerminated):
                return False, f"GOAWAY (error {ev.error_code})"
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                return _verdict(fields, data)
        out = conn.data_to_send()
        if out:
            writer.write(out)


def _verdict(fields: dict[bytes, bytes], data: bytes) -> tuple[bool, str]:
    http = fields.get(b":status", b"?").decode("latin-1")
    if http != "200":
        return False, f"HTTP {http} (not a gRPC server?)"
    code = fields.get(b"grpc-status", b"").decode("latin-1")
    if code != "0":
        message = fields.get(b"grpc-message", b"").decode("latin-1")[:100]
        return False, f"grpc-status {code or 'missing'} {message}".rstrip()
    status = serving_status(data)
    if status is None:
        return False, "a malformed HealthCheckResponse"
    name = STATUS_NAMES.get(status, str(status))
    return status == 1, name


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int | None, int]:
    value = 0
    for shift in range(0, 64, 7):
        if i >= len(data):
            return None, i
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
    return None, i
