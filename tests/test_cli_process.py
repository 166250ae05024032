"""The `edgelb` process as users run it: `edgelb run -c FILE` in a subprocess, then signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from httpkit import HOST, Client, fetch, free_port, slow, within

PYTHON = sys.executable


def config(admin: int, port: int, backend_port: int, grace: str = "5s") -> str:
    return (
        f"admin: {{listen: {HOST}:{admin}}}\n"
        f"shutdown: {{delay: 0s, grace: {grace}}}\n"
        "services:\n"
        "  - name: web\n"
        f"    listen: {HOST}:{port}\n"
        f"    backends: [{{address: {HOST}:{backend_port}}}]\n"
    )


async def start(path) -> asyncio.subprocess.Process:
    """Start `edgelb run` and return once it logs that it runs (an event, not a sleep)."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "edgelb", "run", "-c", str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )

    async def running() -> None:
        while True:
            line = await proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "edgelb exited before it was running"
            if b"edgelb running with" in line:
                return

    try:
        await within(running(), 20)
    except BaseException:
        proc.kill()  # never leave a process behind a failed start
        await proc.wait()
        raise
    return proc


async def test_version_and_help():
    for args, expect in (("--version", b"edgelb "), ("--help", b"edgelb run")):
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "edgelb", args, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await within(proc.communicate(), 20)
        assert proc.returncode == 0
        assert expect in out or expect.split()[0] in out


async def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(backend, tmp_path):
    b = await backend("a", slow(0.6, b"finished"))
    admin, port = free_port(), free_port()
    path = tmp_path / "edgelb.yaml"
    path.write_text(config(admin, port, b.port))
    proc = await start(path)
    try:
        client = await Client.open(port)
        pending = asyncio.ensure_future(client.request("GET", "/slow"))
        await within(b.wait_requests(1))  # the request reached the backend
        proc.send_signal(signal.SIGTERM)
        r = await within(pending)
        assert r.status == 200 and r.body == b"finished"
        client.close()
        started = time.monotonic()
        code = await within(proc.wait(), 10)
        assert code == 0
        assert time.monotonic() - started < 5
        try:  # the port is closed once the process is gone
            await fetch(port)
        except OSError:
            pass
        else:
            raise AssertionError("the proxy port still answers after exit")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_config_exits_1_naming_the_key(tmp_path):
    path = tmp_path / "edgelb.yaml"
    path.write_text(
        "services:\n  - name: web\n    balence: least-loaded\n    listen: 127.0.0.1:1\n"
    )
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "edgelb", "run", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    _, err = await within(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"services[0].balence" in err and b"balance" in err


async def test_a_tls_entrypoint_whose_files_do_not_load_is_refused_naming_them(tmp_path):
    path = tmp_path / "edgelb.yaml"
    port = free_port()
    path.write_text(
        f"admin: {{listen: {HOST}:{free_port()}}}\n"
        f"entrypoints: {{https: {{listen: {HOST}:{port}, tls: {{cert: c.pem, key: k.pem}}}}}}\n"
    )
    for command in ("check", "run"):
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "edgelb", command, "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await within(proc.communicate(), 20)
        assert proc.returncode == 1, command
        assert b"entrypoints.https.tls" in err, command
        assert b"c.pem" in err, command  # the file that could not be read
