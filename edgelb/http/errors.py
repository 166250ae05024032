"""Short responses that edgelb answers itself, each saying which failure it was."""

from __future__ import annotations

REASONS = {
    204: b"No Content",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    413: b"Content Too Large",
    404: b"Not Found",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def local_response(status: int, detail: str, keep_alive: bool, extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 response with a one-line plain text body (none for a 204)."""
    reason = REASONS.get(status, b"Error")
    if status == 204:  # (a CORS preflight's answer)
        conn = b"keep-alive" if keep_alive else b"close"
        return b"HTTP/1.1 204 No Content\r\nconnection: %s\r\n%s\r\n" % (conn, extra)
    body = b"%d %s: %s\n" % (status, reason, detail.encode("utf-8", "replace"))
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: %s\r\n%s\r\n%s" % (status, reason, len(body), conn, extra, body)
    )
