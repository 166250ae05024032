"""A route's CORS filter (watchers.model.Cors), as ingress-nginx's enable-cors does it.

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered by the proxy,
  204, and never reaches a backend: with the Access-Control-Allow-* headers when its origin is
  allowed, without them when it is not (the browser then refuses the real request).
- Any other request from an allowed origin gets Access-Control-Allow-Origin (and
  Allow-Credentials, Expose-Headers) on its response; the backend's own Access-Control-*
  fields are dropped so the route's are the only ones. A disallowed origin gets none.
- Allow-Origin is `*` only when the origins are ["*"] without credentials; else it is the
  request's origin, and the response says `Vary: Origin`.

Origins compare case-insensitively as the browser sends them (scheme://host[:port]);
`https://*.example.com` allows exactly one more label before example.com.
"""

from __future__ import annotations

from watchers.model import Cors

# the backend's own CORS fields, dropped from responses of a CORS route
RESPONSE_FIELDS = ("access-control-allow-origin", "access-control-allow-credentials",
                   "access-control-expose-headers", "access-control-allow-methods",
                   "access-control-allow-headers", "access-control-max-age")


class CompiledCors:
    """A Cors filter ready for the data path: its fixed header lines made once."""

    __slots__ = ("any", "exact", "preflight_lines", "response_lines", "star", "vary",
                 "wildcards")

    def __init__(self, cors: Cors) -> None:
        origins = [o.lower().rstrip("/") for o in cors.allow_origins]
        self.any = "*" in origins
        self.exact = frozenset(o.encode("latin-1") for o in origins if "*" not in o)
        # "https://*.example.com" -> (b"https://", b".example.com")
        self.wildcards = tuple(
            (o[: o.index("*")].encode("latin-1"), o[o.index("*") + 1:].encode("latin-1"))
            for o in origins if "*" in o and o != "*")
        self.star = self.any and not cors.allow_credentials
        self.vary = b"" if self.star else b"vary: Origin\r\n"
        common = b""
        if cors.allow_credentials:
            common += b"access-control-allow-credentials: true\r\n"
        self.response_lines = common
        if cors.expose_headers:
            self.response_lines += b"access-control-expose-headers: %s\r\n" % ", ".join(
                cors.expose_headers).encode("latin-1")
        self.preflight_lines = common + (
            b"access-control-allow-methods: %s\r\n" % ", ".join(cors.allow_methods).encode()
            + b"access-control-allow-headers: %s\r\n" % ", ".join(cors.allow_headers).encode()
            + b"access-control-max-age: %d\r\n" % cors.max_age)

    def allowed(self, origin: bytes) -> bool:
        if self.any:
            return True
        low = origin.lower()
        if low in self.exact:
            return True
        for head, tail in self.wildcards:
            if low.startswith(head) and low.endswith(tail):
                label = low[len(head): len(low) - len(tail)]
                if label and b"." not in label and b"/" not in label and b":" not in label:
                    return True
        return False

    def allow_origin(self, origin: bytes) -> bytes:
        value = b"*" if self.star else origin
        return b"access-control-allow-origin: %s\r\n" % value

    def preflight(self, origin: bytes) -> bytes:
        """The header lines of the proxy's 204 to a preflight from `origin`."""
        if not self.allowed(origin):
            return self.vary
        return self.allow_origin(origin) + self.preflight_lines + self.vary

    def response(self, origin: bytes | None) -> bytes:
        """The header lines added to the response of a request from `origin` (None: none)."""
        if origin is None or not self.allowed(origin):
            return self.vary
        return self.allow_origin(origin) + self.response_lines + self.vary
