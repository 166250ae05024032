"""Accepting connections from a non-blocking listening socket, for the listeners that run their
own accept loop (tcp static ports, TLS entrypoints peeking at ClientHellos)."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("edgelb.net.accept")

ACCEPT_BATCH = 64  # connections accepted per readiness callback
ACCEPT_PAUSE = 0.1  # seconds to stop accepting when out of file descriptors
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


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
