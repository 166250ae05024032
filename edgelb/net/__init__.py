"""Sockets and the bytes before a protocol: accept loops, the PROXY protocol, SNI,
server and client TLS, and source-address access control.

See ARCHITECTURE.md."""
