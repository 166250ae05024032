"""Listening sockets, and accepting from them: `bind` opens the listening sockets of every
listener (http, TLS entrypoints, tcp static ports); `accept_batch` is the accept loop of the
listeners that run their own (tcp static ports, TLS entrypoints peeking at ClientHellos)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("edgelb.net.accept")

BACKLOG = 1024  # pending connections a listening socket holds
ACCEPT_BATCH = 64  # connections accepted per readiness callback
ACCEPT_PAUSE = 0.1  # seconds to stop accepting when out of file descriptors
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# Worker processes (edgelb.workers) each bind their own listening socket with SO_REUSEPORT
# (the kernel spreads new connections over them); control holds one more, bound and never
# listening, so that the port stays this process group's whatever becomes of the workers.
_reuse_port = False


def share_ports(on: bool) -> None:
    """Bind every listening socket from now on with SO_REUSEPORT (worker processes)."""
    global _reuse_port
    _reuse_port = on


async def bind(loop: asyncio.AbstractEventLoop, host: str, port: int, what: str,
               listen: bool = True) -> list[socket.socket]:
    """Non-blocking listening sockets for `host`:`port`, one per address family when `host` is
    "" or "*" (the IPv6 one v6-only, so both can hold the port). `what` names the listener in
    the error (an OSError, with the errno of the failure) when it cannot listen there.
    `listen=False`: bound only, to hold the port (control's, with share_ports)."""
    where = f"{what} cannot listen on {host or '*'}:{port}"
    try:
        infos = await loop.getaddrinfo(None if host in ("", "*") else host, port,
                                       type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise OSError(e.errno, f"{where}: cannot resolve the address: {e}") from e
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if _reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            if listen:
                sock.listen(BACKLOG)
            sock.setblocking(False)
            try:  # inherited by accepted sockets
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
    except OSError as e:
        for sock in socks:
            sock.close()
        raise OSError(e.errno, f"{where}: {e.strerror}; free the port or choose another "
                               "listen address") from e
    return socks


def accept_batch(
    lsock: socket.socket,
    what: str,
    pause: Callable[[], None],
    accepted: Callable[[socket.socket, str], None],
) -> None:
    """Accept up to ACCEPT_BATCH pending connections, handing each to `accepted(sock, ip)`.

    Out of file descriptors (or buffers), `pause()` is called: the listener stops accepting for
    ACCEPT_PAUSE seconds rather than spin on a readable socket it cannot accept from. `what`
    names the listener in the log."""
    for _ in range(ACCEPT_BATCH):
        try:
            sock, peer = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionAbortedError:
            continue
        except OSError as e:
            if e.errno in _RESOURCE_ERRNOS:
                log.warning("%s: cannot accept (%s); pausing accepts for %.1fs; raise the open "
                            "files limit (ulimit -n) if this repeats", what, e.strerror,
                            ACCEPT_PAUSE)
                pause()
            else:
                log.error("%s: accept failed: %s", what, e)
            return
        accepted(sock, str(peer[0]) if peer else "")


def refuse(refused: dict[str, int], reason: str, sock: socket.socket) -> None:
    """Close an accepted connection a listener turns away, counted under `reason`."""
    refused[reason] = refused.get(reason, 0) + 1
    sock.close()


def nonblocking(sock: socket.socket) -> bool:
    """Make an accepted socket non-blocking; False (and closed) when the client is gone."""
    try:
        sock.setblocking(False)
    except OSError:
        sock.close()
        return False
    return True
