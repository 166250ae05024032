"""Headless Chromium driven over the DevTools protocol (a WebSocket on 127.0.0.1), to watch
a page change while a test acts: `Browser.open(url)`, then `evaluate(js)`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium")
_LISTENING = re.compile(rb"DevTools listening on (ws://[^\s]+)")


class PageError(RuntimeError):
    """The evaluated expression raised in the page."""


class Browser:
    """One headless Chromium showing one page; `close()` ends it."""

    def __init__(self, proc: asyncio.subprocess.Process, session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.proc = proc
        self.session = session
        self.ws = ws
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str, profile: Path, javascript: bool = True) -> Browser:
        assert CHROMIUM is not None, "chromium is not installed"
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--no-first-run",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--user-data-dir={profile}"]
        if not javascript:
            args.append("--blink-settings=scriptEnabled=false")
        proc = await asyncio.create_subprocess_exec(
            *args, url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            assert proc.stderr is not None
            browser_ws = None
            while browser_ws is None:
                line = await asyncio.wait_for(proc.stderr.readline(), 30)
                if not line:
                    raise RuntimeError("chromium exited before listening for DevTools")
                m = _LISTENING.search(line)
                if m:
                    browser_ws = m.group(1).decode()
            base = "http://" + browser_ws.split("/")[2]
            page = None
            while page is None:  # the page target appears once the tab opens
                async with session.get(base + "/json/list") as r:
                    targets = await r.json()
                page = next((t for t in targets if t.get("type") == "page"), None)
                if page is None:
                    await asyncio.sleep(0.05)
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await session.close()
            await _end(proc)
            raise
        # stderr is not read from here on: drain it so chromium never blocks writing
        asyncio.get_running_loop().create_task(_drain(proc.stderr))
        return cls(proc, session, ws)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result."""
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection ended: {msg.type}")
            reply = json.loads(msg.data)
            if reply.get("id") != msg_id:
                continue  # an event
            if "error" in reply:
                raise PageError(f"{method}: {reply['error']}")
            return reply["result"]

    async def outer_html(self) -> str:
        """The document as it is now (the DOM domain: works with JavaScript off too)."""
        root = (await self.send("DOM.getDocument", depth=0))["root"]
        return (await self.send("DOM.getOuterHTML", nodeId=root["nodeId"]))["outerHTML"]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            detail = result["exceptionDetails"].get("exception", {}).get("description")
            raise PageError(f"{expression!r} raised: {detail}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 10.0, what: str = "") -> Any:
        """Evaluate `expression` every 50 ms until it is truthy (an exception counts as not
        yet: the page may still be loading); its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            error = None
            try:
                value = await self.evaluate(expression)
            except PageError as e:
                value, error = None, e
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"{what or expression} did not hold within {timeout:g}s"
                                     + (f" (last: {error})" if error else ""))
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.session.close()
        await _end(self.proc)


async def _drain(stream: asyncio.StreamReader | None) -> None:
    if stream is not None:
        with contextlib.suppress(Exception):
            while await stream.read(65536):
                pass


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
