"""HTTP to Marathon: the apps and the event stream, over several URLs with failover.

aiohttp (a dependency of edgelb already, which serves its admin endpoint with it) does the
HTTP: connection reuse, chunked streams, TLS with a CA, timeouts. What Marathon needs on top is
here:

- Failover: a request goes to the Marathon that answered last, then to the others in the
  configured order; the first good answer wins and becomes the one used next. When all fail,
  `MarathonError` says what each one did.
- Leader redirects: a non-leader Marathon answers 307 (older ones 302) with the leader's URL;
  it is followed once per request, with the same credentials (the leader is one of ours).
- Credentials: HTTP basic auth (marathon-lb's --auth-credentials), a ready token
  (`Authorization: token=...`, read from its file again after a 401), or DC/OS service-account
  credentials (marathon-lb's --dcos-auth-credentials: the JSON with uid, private_key and
  login_endpoint): a login with an RS256-signed JWT gets the token, and a 401 logs in again.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

log = logging.getLogger("edgelb.marathon")

APPS_PATH = "/v2/apps?embed=apps.tasks&embed=apps.readiness"
EVENTS_PATH = "/v2/events"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_APPS_BYTES = 64 << 20  # an /v2/apps answer larger than this is refused
LOGIN_TTL = 3600  # seconds a DC/OS login JWT is valid


class MarathonError(Exception):
    """No Marathon gave a usable answer; the message says what each one did."""


class AuthError(MarathonError):
    """The credentials could not be used (a file that does not read, a login refused)."""


@dataclass(frozen=True, slots=True)
class DcosCredentials:
    """A DC/OS service account, as marathon-lb's --dcos-auth-credentials file holds it."""

    uid: str
    private_key: str  # PEM, RSA
    login_endpoint: str

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "the DC/OS credentials") -> DcosCredentials:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise AuthError(f"{origin}: not JSON ({e}); give the service-account JSON with "
                            "uid, private_key and login_endpoint") from None
        if not isinstance(doc, dict):
            raise AuthError(f"{origin}: expected a JSON object with uid, private_key and "
                            "login_endpoint")
        missing = [k for k in ("uid", "private_key", "login_endpoint")
                   if not isinstance(doc.get(k), str) or not doc[k]]
        if missing:
            raise AuthError(f"{origin}: {', '.join(missing)} missing; the service-account JSON "
                            "needs uid, private_key and login_endpoint")
        return cls(doc["uid"], doc["private_key"], doc["login_endpoint"])


def login_jwt(creds: DcosCredentials, now: float | None = None) -> str:
    """The RS256 JWT a DC/OS login takes: {"uid": ..., "exp": ...} signed with the account's
    private key (`cryptography` does the RSA)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    try:
        key = serialization.load_pem_private_key(creds.private_key.encode(), password=None)
    except (ValueError, TypeError) as e:
        raise AuthError(f"DC/OS credentials of {creds.uid}: private_key is not a PEM key "
                        f"without a passphrase ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise AuthError(f"DC/OS credentials of {creds.uid}: private_key must be an RSA key")
    exp = int((time.time() if now is None else now) + LOGIN_TTL)
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = b64(json.dumps({"uid": creds.uid, "exp": exp}, separators=(",", ":")).encode())
    signing = f"{header}.{claims}".encode()
    signature = key.sign(signing, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{claims}.{b64(signature)}"


class Stream:
    """An open event stream: `read()` the next bytes (b"" at its end); `close()` it."""

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self.response = response
        self.url = url  # the Marathon it comes from (after a redirect: the leader)

    async def read(self) -> bytes:
        """The next bytes of the stream, b"" at its end; MarathonError when it breaks."""
        try:
            return await self.response.content.readany()
        except (aiohttp.ClientError, OSError) as e:
            raise MarathonError(f"the event stream from {self.url} broke: {_describe(e)}"
                                ) from None

    def close(self) -> None:
        self.response.close()


class MarathonClient:
    """Requests to the first Marathon of `urls` that answers (see the module docstring).

    `user`/`password`: basic auth; `token`: reads a ready token (called again after a 401);
    `dcos`: a service account to log in with; `ca`: a CA file for https URLs."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        user: str | None = None,
        password: str | None = None,
        token: Callable[[], str] | None = None,
        dcos: DcosCredentials | None = None,
        ca: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        if not urls:
            raise ValueError("MarathonClient needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.preferred = 0  # the index of the Marathon that answered last
        self.user = user
        self.password = password
        self.token_source = token
        self.dcos = dcos
        self.ca = ca
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._token = ""  # the token in use (from the file or a login)
        self._session: aiohttp.ClientSession | None = None

    # -- plumbing ------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.ca:
            try:
                return ssl.create_default_context(cafile=self.ca)
            except (OSError, ssl.SSLError) as e:
                raise AuthError(f"watchers.marathon.ca: cannot load {self.ca} ({e}); give a "
                                "PEM file of the CA that signed Marathon's certificate") from None
        return True

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=8)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def order(self) -> list[int]:
        """The URLs to try: the one that answered last, then the others in order."""
        return [self.preferred] + [i for i in range(len(self.urls)) if i != self.preferred]

    async def _headers(self, accept: str, refresh: bool = False) -> dict[str, str]:
        headers = {"Accept": accept}
        if self.user is not None:
            basic = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        elif self.dcos is not None or self.token_source is not None:
            if refresh or not self._token:
                self._token = await self._new_token()
            headers["Authorization"] = f"token={self._token}"
        return headers

    async def _new_token(self) -> str:
        if self.token_source is not None:
            try:
                token = self.token_source().strip()
            except OSError as e:
                raise AuthError(f"watchers.marathon.token_file: cannot read it ({e})") from None
            if not token:
                raise AuthError("watchers.marathon.token_file: the file is empty; write the "
                                "token in it")
            return token
        assert self.dcos is not None
        body = {"uid": self.dcos.uid, "token": login_jwt(self.dcos)}
        try:
            async with self.session().post(
                self.dcos.login_endpoint, json=body,
                timeout=aiohttp.ClientTimeout(total=self.read_timeout)) as r:
                text = await r.text()
                if r.status != 200:
                    raise AuthError(f"DC/OS login at {self.dcos.login_endpoint} as "
                                    f"{self.dcos.uid}: HTTP {r.status} {text[:200]!r}")
                token = json.loads(text).get("token")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
            raise AuthError(f"DC/OS login at {self.dcos.login_endpoint}: {e!r}") from None
        if not isinstance(token, str) or not token:
            raise AuthError(f"DC/OS login at {self.dcos.login_endpoint}: no token in the answer")
        return token

    async def _open(self, path: str, accept: str, timeout: aiohttp.ClientTimeout
                    ) -> tuple[aiohttp.ClientResponse, str]:
        """The first good response for `path` (failover, one redirect, one re-login), open;
        with the URL that gave it."""
        failures: list[str] = []
        for index in self.order():
            base = self.urls[index]
            try:
                response, url = await self._open_one(base, path, accept, timeout)
            except AuthError:
                raise
            except MarathonError as e:
                failures.append(str(e))
                continue
            if index != self.preferred:
                log.warning("marathon: now using %s (%s)", base, "; ".join(failures) or "first")
            self.preferred = index
            return response, url
        raise MarathonError("no Marathon answered: " + "; ".join(failures))

    async def _open_one(self, base: str, path: str, accept: str,
                        timeout: aiohttp.ClientTimeout) -> tuple[aiohttp.ClientResponse, str]:
        url = base + path
        where = base  # names it in errors: the Marathon, not the whole query
        redirected = False
        relogged = False
        while True:
            headers = await self._headers(accept)
            try:
                r = await self.session().get(url, headers=headers, allow_redirects=False,
                                             timeout=timeout)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise MarathonError(f"{where}: {_describe(e)}") from None
            if r.status in REDIRECTS and not redirected:
                location = r.headers.get("Location", "")
                r.release()
                if not location:
                    raise MarathonError(f"{where}: HTTP {r.status} without a Location")
                url = urljoin(url, location)
                where = f"{base} (redirected to {_origin(url)})"
                redirected = True
                continue
            if r.status == 401 and not relogged and (self.dcos or self.token_source):
                r.release()
                self._token = ""  # log in (or read the file) again, once
                relogged = True
                continue
            if r.status != 200:
                text = await _head_of_body(r)
                r.release()
                hint = (" (check watchers.marathon.auth / token_file / dcos_credentials)"
                        if r.status in (401, 403) else
                        " (a second redirect: not followed)" if r.status in REDIRECTS else "")
                raise MarathonError(f"{where}: HTTP {r.status}{hint} {text!r}")
            return r, _origin(url)

    # -- the two calls -------------------------------------------------------------------

    async def apps(self) -> list[Any]:
        """The `apps` of `GET /v2/apps?embed=apps.tasks&embed=apps.readiness`, JSON-decoded
        (untrusted: the translation checks every element)."""
        timeout = aiohttp.ClientTimeout(total=self.read_timeout, sock_connect=self.connect_timeout)
        failures: list[str] = []
        for _ in range(len(self.urls)):
            response, url = await self._open(APPS_PATH, "application/json", timeout)
            try:
                body = await _read_limited(response, MAX_APPS_BYTES)
                doc = json.loads(body)
                apps = doc.get("apps") if isinstance(doc, dict) else None
                if not isinstance(apps, list):
                    raise ValueError("no apps list in the answer")
                return apps
            except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as e:
                failures.append(f"{url}: {_describe(e)}")
                self.preferred = (self.preferred + 1) % len(self.urls)  # try another one
            finally:
                response.release()
        raise MarathonError("no Marathon gave the apps: " + "; ".join(failures))

    async def events(self, event_types: Sequence[str] = ()) -> Stream:
        """Open `GET /v2/events` (text/event-stream), filtered to `event_types`."""
        query = "&".join(f"event_type={t}" for t in event_types)
        path = EVENTS_PATH + (f"?{query}" if query else "")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                        sock_read=None)
        response, url = await self._open(path, "text/event-stream", timeout)
        ctype = response.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            response.release()
            raise MarathonError(f"{url}: answered {ctype or 'no content type'}, not an event "
                                "stream (is it Marathon?)")
        return Stream(response, url)


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.read(1 << 16):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"the answer is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _head_of_body(response: aiohttp.ClientResponse) -> str:
    try:
        return (await response.content.read(200)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError, OSError):
        return ""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
