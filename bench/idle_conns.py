"""Open N keep-alive HTTP connections to a proxy, one request each, then hold them idle.

Protocol with the parent (bench.py), one line each way on stdout/stdin:
  -> "READY <opened> <failed>"   once every connection got its response (or failed)
  <- "check"                     parent has measured; count the ones still open
  -> "ALIVE <open>"              then all connections are closed and the process exits
Everything is bounded: per-connection timeouts, a concurrency cap, and a hold limit after
which the connections are closed even if the parent never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_one(host: str, port: int, sem: asyncio.Semaphore, timeout: float) -> Conn:
    """Connect, send one GET, read the whole response, and keep the connection open."""
    async with sem:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            status_line, _, rest = head.partition(b"\r\n")
            if b" 200 " not in status_line + b" ":
                raise RuntimeError(f"unexpected status line {status_line!r}")
            length = 0
            for line in rest.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), timeout)
        except BaseException:
            writer.close()
            raise
        return reader, writer


def still_open(conn: Conn) -> bool:
    reader, writer = conn
    return not (reader.at_eof() or reader.exception() is not None or writer.is_closing())


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=10.0, help="per connection step, seconds")
    ap.add_argument("--hold", type=float, default=120.0, help="max seconds to hold, then exit")
    args = ap.parse_args()

    sem = asyncio.Semaphore(args.concurrency)
    results = await asyncio.gather(
        *(open_one(args.host, args.port, sem, args.timeout) for _ in range(args.count)),
        return_exceptions=True,
    )
    conns = [r for r in results if isinstance(r, tuple)]
    errors = [r for r in results if not isinstance(r, tuple)]
    if errors:
        print(f"first error: {errors[0]!r}", file=sys.stderr, flush=True)
    print(f"READY {len(conns)} {len(errors)}", flush=True)

    loop = asyncio.get_running_loop()
    command: asyncio.Future[None] = loop.create_future()
    fd = sys.stdin.fileno()

    def on_stdin() -> None:  # any input or EOF on stdin means "check now"
        if not command.done():
            command.set_result(None)

    loop.add_reader(fd, on_stdin)
    try:
        await asyncio.wait_for(command, args.hold)
    except TimeoutError:
        print("hold time over without a 'check' from the parent", file=sys.stderr, flush=True)
    finally:
        loop.remove_reader(fd)
    await asyncio.sleep(0)  # let pending EOF/reset callbacks run
    print(f"ALIVE {sum(still_open(c) for c in conns)}", flush=True)
    for _, writer in conns:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
