"""The accept loop shared by the tcp listener and the TLS entrypoints' own accepting."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from edgelb.net.accept import ACCEPT_BATCH, accept_batch, bind


class Scripted:
    """A listening socket whose accept() follows a script of results and errors."""

    def __init__(self, *script: object) -> None:
        self.script = list(script)
        self.calls = 0

    def accept(self) -> tuple[object, tuple[str, int]]:
        self.calls += 1
        item = self.script.pop(0) if self.script else BlockingIOError()
        if isinstance(item, BaseException):
            raise item
        return item, ("10.0.0.9", 4000)


def run(lsock: Scripted) -> tuple[list[tuple[object, str]], int]:
    got: list[tuple[object, str]] = []
    paused = []
    accept_batch(lsock, "test listener", lambda: paused.append(1),  # type: ignore[arg-type]
                 lambda s, ip: got.append((s, ip)))
    return got, len(paused)


def test_accepts_until_nothing_is_pending_and_skips_aborted_handshakes() -> None:
    got, paused = run(Scripted("a", ConnectionAbortedError(), "b"))
    assert got == [("a", "10.0.0.9"), ("b", "10.0.0.9")]
    assert paused == 0


def test_out_of_descriptors_pauses_instead_of_spinning() -> None:
    lsock = Scripted("a", OSError(errno.EMFILE, "Too many open files"), "b")
    got, paused = run(lsock)
    assert got == [("a", "10.0.0.9")] and paused == 1
    assert lsock.script == ["b"]  # nothing more tried in this callback


def test_other_errors_end_the_batch_without_pausing() -> None:
    got, paused = run(Scripted(OSError(errno.EINVAL, "Invalid argument"), "a"))
    assert got == [] and paused == 0


def test_a_batch_is_bounded() -> None:
    lsock = Scripted(*["c"] * (ACCEPT_BATCH + 10))
    got, _ = run(lsock)
    assert len(got) == ACCEPT_BATCH and len(lsock.script) == 10


def test_a_real_listening_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        clients = [socket.create_connection(lsock.getsockname()) for _ in range(3)]
        got: list[tuple[socket.socket, str]] = []
        accept_batch(lsock, "real", lambda: None, lambda s, ip: got.append((s, ip)))
        assert [ip for _, ip in got] == ["127.0.0.1"] * 3
        for s, _ in got:
            s.close()
        for c in clients:
            c.close()


async def test_bind_gives_listening_nonblocking_sockets_and_names_the_listener_on_failure(
) -> None:
    loop = asyncio.get_running_loop()
    socks = await bind(loop, "127.0.0.1", 0, "tcp listener web")
    try:
        assert len(socks) == 1
        sock = socks[0]
        assert not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with pytest.raises(OSError) as info:
            await bind(loop, "127.0.0.1", port, "entrypoint https")
        assert info.value.errno == errno.EADDRINUSE
        message = str(info.value)
        assert "entrypoint https" in message and f"127.0.0.1:{port}" in message
        assert "free the port" in message
    finally:
        for sock in socks:
            sock.close()
