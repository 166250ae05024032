"""Test helper: a throwaway CA and certificates made at test time (needs `cryptography`, a test
dependency only), a tiny TLS HTTP server and a client that reports what it was served.

Keys are EC P-256 and made once per process (`key(n)`), so issuing a certificate costs only a
signature.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@functools.cache
def key(n: int = 0) -> ec.EllipticCurvePrivateKey:
    """The n-th EC P-256 key of this process (cached)."""
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_pem(k: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None
            ) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class CA:
    """A self-signed test CA; `issue()` signs leaf certificates."""

    cert: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        names: Sequence[str] = ("localhost",),
        *,
        serial: int | None = None,
        leaf_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        cn: str | None = None,
        ips: Sequence[str] = (),
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a server certificate for `names` (SANs)."""
        now = dt.datetime.now(dt.UTC)
        leaf_key = leaf_key if leaf_key is not None else key(1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn or (names[0] if names else "no-san")))
            .issuer_name(self.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(hours=1))
            .not_valid_after(not_after or now + dt.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
        )
        general: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        general += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        if general:
            builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
        cert = builder.sign(self.private_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(leaf_key)


@functools.cache
def ca() -> CA:
    """The process's test CA (cached)."""
    k = key(0)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("edgelb test CA"))
        .issuer_name(_name("edgelb test CA"))
        .public_key(k.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(k, hashes.SHA256())
    )
    return CA(cert, k)


def secret(namespace: str, name: str, cert_pem: bytes, key_pem_: bytes,
           kind: str = "kubernetes.io/tls") -> dict:
    """A Secret object as the Kubernetes API returns it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": kind,
        "metadata": {"namespace": namespace, "name": name},
        "data": {"tls.crt": base64.b64encode(cert_pem).decode(),
                 "tls.key": base64.b64encode(key_pem_).decode()},
    }


def client_context(verify: bool = True) -> ssl.SSLContext:
    """A client trusting the test CA (hostname checked), or trusting nothing at all."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cadata=ca().pem.decode())


# ---------------------------------------------------------------------------------------------
# A TLS server answering one fixed response, and a client reporting the handshake.


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def serve(ctx: ssl.SSLContext) -> tuple[asyncio.AbstractServer, int]:
    """A TLS server on 127.0.0.1 (free port) answering every request with RESPONSE."""
    server = await asyncio.start_server(_answer, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


@dataclass
class Served:
    serial: int
    names: list[str]
    alpn: str | None
    version: str | None
    body: bytes


def peer(ssl_obj: ssl.SSLObject) -> tuple[int, list[str]]:
    der = ssl_obj.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = list(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    return cert.serial_number, names


async def fetch(port: int, server_hostname: str | None, ctx: ssl.SSLContext | None = None,
                timeout: float = 5.0) -> Served:
    """Handshake (SNI = server_hostname), send one request, read the whole response."""
    ctx = ctx or client_context(verify=server_hostname is not None)

    async def go() -> Served:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname or "")
        try:
            obj = writer.get_extra_info("ssl_object")
            serial, names = peer(obj)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            body = await reader.read()
            return Served(serial, names, obj.selected_alpn_protocol(), obj.version(), body)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)
