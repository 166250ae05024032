"""FileWatcher on real temporary files: every test awaits what the watcher reports."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import watchers.file as file_mod
from edgelb.ops.config import Config, ConfigError, config_loader
from watchers.file import FileWatcher

FAST = 0.02  # poll interval for most tests
WAIT = 3.0  # upper bound on any single await; a healthy run takes a few polls


class Recorder:
    """Collects what the watcher reports, as queues to await on."""

    def __init__(self) -> None:
        self.values: asyncio.Queue[str] = asyncio.Queue()
        self.errors: asyncio.Queue[Exception] = asyncio.Queue()

    def emit(self, value: str) -> None:
        self.values.put_nowait(value)

    def on_error(self, exc: Exception) -> None:
        self.errors.put_nowait(exc)

    async def value(self) -> str:
        return await asyncio.wait_for(self.values.get(), WAIT)

    async def error(self) -> Exception:
        return await asyncio.wait_for(self.errors.get(), WAIT)


def decode(data: bytes) -> str:
    text = data.decode()
    if text.startswith("bad"):
        raise ValueError(f"cannot load {text!r}")
    return text


class CountingWatcher(FileWatcher[str]):
    """Signals every finished poll, so a test can wait for the watcher to have looked again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.polled = asyncio.Condition()

    async def poll(self, force: bool = False) -> bool:
        emitted = await super().poll(force)
        async with self.polled:
            self.polled.notify_all()
        return emitted

    async def more_polls(self, n: int) -> None:
        target = self.polls + n
        async with self.polled:
            await asyncio.wait_for(self.polled.wait_for(lambda: self.polls >= target), WAIT)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    p = tmp_path / "edge.yaml"
    p.write_text("one")
    return p


@asynccontextmanager
async def watching(path: Path, rec: Recorder, **kwargs: Any) -> AsyncIterator[CountingWatcher]:
    """Run a watcher on `path` for the body of the `async with`, then stop it."""
    w = CountingWatcher(path, decode, rec.emit, rec.on_error, **{"interval": FAST, **kwargs})
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(task, WAIT)


async def test_first_read_is_emitted_at_once(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec) as w:
        assert await rec.value() == "one"
        assert w.value == "one" and w.loaded


async def test_in_place_write(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec):
        assert await rec.value() == "one"
        with open(conf, "w") as f:  # same inode, truncated and rewritten
            f.write("two, longer")
        assert await rec.value() == "two, longer"
        with open(conf, "r+") as f:  # same inode, same size
            f.write("TWO")
        assert await rec.value() == "TWO, longer"


async def test_atomic_rename(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec):
        assert await rec.value() == "one"
        tmp = conf.with_suffix(".tmp")
        tmp.write_text("two")
        os.replace(tmp, conf)
        assert await rec.value() == "two"
        tmp.write_text("six")  # same size, new inode
        os.replace(tmp, conf)
        assert await rec.value() == "six"


async def test_unchanged_content_is_not_emitted_again(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec) as w:
        assert await rec.value() == "one"
        conf.write_text("one")  # rewritten with the same bytes: new mtime, same hash
        await w.more_polls(4)
        conf.write_text("two")
        assert await rec.value() == "two"  # not a second "one"
        assert rec.values.empty()


async def test_trigger_reemits_unchanged_content(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec, interval=60.0) as w:
        assert await rec.value() == "one"
        w.trigger()
        assert await rec.value() == "one"
        conf.write_text("two")
        w.trigger()  # read now, not in 60 s
        assert await rec.value() == "two"


async def test_bad_content_keeps_last_good(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec) as w:
        assert await rec.value() == "one"
        conf.write_text("bad content")
        err = await rec.error()
        assert isinstance(err, ValueError) and "bad content" in str(err)
        assert w.value == "one"
        await w.more_polls(4)  # the same bad content is reported once
        assert rec.errors.empty() and rec.values.empty()
        conf.write_text("three")
        assert await rec.value() == "three"
        assert w.value == "three"


async def test_trigger_on_bad_content_reports_again(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec) as w:
        assert await rec.value() == "one"
        conf.write_text("bad")
        await rec.error()
        w.trigger()
        await rec.error()
        assert rec.values.empty() and w.value == "one"


async def test_deletion_reported_once_then_recreation(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec) as w:
        assert await rec.value() == "one"
        conf.unlink()
        err = await rec.error()
        assert isinstance(err, FileNotFoundError) and str(conf) in str(err)
        await w.more_polls(5)
        assert rec.errors.empty(), "a missing file is reported once"
        assert w.value == "one"
        conf.write_text("back")
        assert await rec.value() == "back"
        conf.unlink()
        assert isinstance(await rec.error(), FileNotFoundError)  # reported again after a return


async def test_recreation_with_same_content_is_emitted(conf: Path) -> None:
    rec = Recorder()
    async with watching(conf, rec):
        assert await rec.value() == "one"
        conf.unlink()
        await rec.error()
        conf.write_text("one")
        assert await rec.value() == "one"


async def test_missing_at_start(tmp_path: Path) -> None:
    rec = Recorder()
    path = tmp_path / "later.yaml"
    async with watching(path, rec) as w:
        assert isinstance(await rec.error(), FileNotFoundError)
        assert w.value is None and not w.loaded
        path.write_text("hello")
        assert await rec.value() == "hello"


async def test_unreadable_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    rec = Recorder()
    path = tmp_path / "dir.yaml"
    path.mkdir()  # stat works, open fails
    async with watching(path, rec) as w:
        err = await rec.error()
        assert isinstance(err, OSError)
        await w.more_polls(3)
        assert rec.errors.empty()


async def test_same_signature_rewrite_caught_by_periodic_hash(
        conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Make every rewrite of the same size look unchanged to stat, as a coarse clock would.
    monkeypatch.setattr(file_mod, "_signature", lambda st: (st.st_size, 0, 0, 0, 0))
    rec = Recorder()
    async with watching(conf, rec, verify_every=3):
        assert await rec.value() == "one"
        conf.write_text("two")
        assert await rec.value() == "two"


async def test_emit_failure_does_not_stop_watching(conf: Path) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()

    def emit(value: str) -> None:
        seen.put_nowait(value)
        raise RuntimeError("consumer broke")

    w = FileWatcher(conf, decode, emit, interval=FAST)
    task = asyncio.create_task(w.run())
    try:
        assert await asyncio.wait_for(seen.get(), WAIT) == "one"
        conf.write_text("two")
        assert await asyncio.wait_for(seen.get(), WAIT) == "two"
    finally:
        w.stop()
        await asyncio.wait_for(task, WAIT)


async def test_async_emit_is_awaited(conf: Path) -> None:
    done = asyncio.Event()
    got: list[str] = []

    async def emit(value: str) -> None:
        await asyncio.sleep(0)
        got.append(value)
        done.set()

    w = FileWatcher(conf, decode, emit, interval=FAST)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(done.wait(), WAIT)
        assert got == ["one"]
    finally:
        w.stop()
        await asyncio.wait_for(task, WAIT)


async def test_stop_ends_run_promptly(conf: Path) -> None:
    w = FileWatcher(conf, decode, lambda v: None, interval=60.0)
    task = asyncio.create_task(w.run())
    await asyncio.sleep(0)
    w.stop()
    await asyncio.wait_for(task, 1.0)


async def test_change_applied_within_a_second_at_default_interval(conf: Path) -> None:
    rec = Recorder()
    w = FileWatcher(conf, decode, rec.emit, rec.on_error)
    assert w.interval == 0.25
    task = asyncio.create_task(w.run())
    try:
        assert await rec.value() == "one"
        conf.write_text("two")
        start = time.monotonic()
        assert await asyncio.wait_for(rec.values.get(), 1.0) == "two"
        assert time.monotonic() - start < 1.0
    finally:
        w.stop()
        await asyncio.wait_for(task, WAIT)


def test_interval_must_be_positive(conf: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        FileWatcher(conf, decode, lambda v: None, interval=0)


async def test_with_the_real_config_loader(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("services:\n  - {name: web, listen: 10000}\n")
    configs: asyncio.Queue[Config] = asyncio.Queue()
    errors: asyncio.Queue[Exception] = asyncio.Queue()
    w = FileWatcher(path, config_loader(str(path)), configs.put_nowait, errors.put_nowait,
                    interval=FAST)
    task = asyncio.create_task(w.run())
    try:
        first = await asyncio.wait_for(configs.get(), WAIT)
        assert [s.name for s in first.snapshot.services] == ["web"]
        path.write_text("services:\n  - {name: web, listen: 10000, balence: x}\n")
        err = await asyncio.wait_for(errors.get(), WAIT)
        assert isinstance(err, ConfigError) and "did you mean 'balance'" in str(err)
        assert w.value is first
        tmp = tmp_path / "edge.yaml.new"
        tmp.write_text("services:\n  - {name: api, listen: 10001}\n")
        os.replace(tmp, path)
        second = await asyncio.wait_for(configs.get(), WAIT)
        assert [s.name for s in second.snapshot.services] == ["api"]
    finally:
        w.stop()
        await asyncio.wait_for(task, WAIT)


# -- files the loader reads besides the watched one (e.g. certificates a config names) -----------


@asynccontextmanager
async def with_depends(path: Path, rec: Recorder) -> AsyncIterator[CountingWatcher]:
    """A watcher whose loader reads the file named by `path`'s content through `w.read()`:
    the value is "<name>=<its content>" ("<name>=missing" when it cannot be read)."""

    def load(data: bytes) -> str:
        name = data.decode().strip()
        try:
            return f"{name}={w.read(path.parent / name).decode()}"
        except OSError:
            return f"{name}=missing"

    w = CountingWatcher(path, load, rec.emit, rec.on_error, interval=FAST)
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(task, WAIT)


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_a_file_the_loader_reads_is_watched_in_place_and_renamed(tmp_path: Path) -> None:
    conf = tmp_path / "edge.yaml"
    conf.write_text("tls.crt")
    (tmp_path / "tls.crt").write_text("v1")
    rec = Recorder()
    async with with_depends(conf, rec) as w:
        assert await rec.value() == "tls.crt=v1"
        assert w.depends == (str(tmp_path / "tls.crt"),)
        (tmp_path / "tls.crt").write_text("v2, in place")
        assert await rec.value() == "tls.crt=v2, in place"
        replace(tmp_path / "tls.crt", "v3")
        assert await rec.value() == "tls.crt=v3"
        (tmp_path / "tls.crt").write_text("v3")  # the same bytes again: nothing to do
        await w.more_polls(10)  # past a periodic verification too
        assert rec.values.empty() and rec.errors.empty()


def kubelet_swap(directory: Path, stamp: str, files: dict[str, bytes]) -> None:
    """Write `files` as kubelet updates a mounted Secret: a new timestamped directory, the
    `..data` link swapped to it atomically, `name -> ..data/name` links, the old one removed."""
    fresh = directory / f"..{stamp}"
    fresh.mkdir()
    for name, data in files.items():
        (fresh / name).write_bytes(data)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.symlink(fresh.name, directory / "..data_tmp")
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if old is not None:
        shutil.rmtree(directory / old)


async def test_a_kubelet_symlink_swap_of_a_dependency_is_seen(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    kubelet_swap(secret, "2026_12_07_01_00_00.1", {"tls.crt": b"v1"})
    conf = tmp_path / "edge.yaml"
    conf.write_text("secret/tls.crt")
    rec = Recorder()
    async with with_depends(conf, rec):
        assert await rec.value() == "secret/tls.crt=v1"
        kubelet_swap(secret, "2026_12_07_02_00_00.2", {"tls.crt": b"v2"})
        assert await rec.value() == "secret/tls.crt=v2"


async def test_a_missing_dependency_is_loaded_when_it_appears(tmp_path: Path) -> None:
    conf = tmp_path / "edge.yaml"
    conf.write_text("later.crt")
    rec = Recorder()
    async with with_depends(conf, rec) as w:
        assert await rec.value() == "later.crt=missing"
        await w.more_polls(3)
        assert rec.values.empty(), "a file that stays missing is not a change"
        replace(tmp_path / "later.crt", "here")
        assert await rec.value() == "later.crt=here"
        (tmp_path / "later.crt").unlink()
        assert await rec.value() == "later.crt=missing"  # its loss is a change too


async def test_the_watched_files_are_those_of_the_latest_load(tmp_path: Path) -> None:
    conf = tmp_path / "edge.yaml"
    conf.write_text("a.crt")
    (tmp_path / "a.crt").write_text("a1")
    (tmp_path / "b.crt").write_text("b1")
    rec = Recorder()
    async with with_depends(conf, rec) as w:
        assert await rec.value() == "a.crt=a1"
        replace(conf, "b.crt")
        assert await rec.value() == "b.crt=b1"
        assert w.depends == (str(tmp_path / "b.crt"),)
        replace(tmp_path / "a.crt", "a2")  # no longer read: not watched
        await w.more_polls(5)
        assert rec.values.empty()
        replace(tmp_path / "b.crt", "b2")
        assert await rec.value() == "b.crt=b2"


def test_watchers_file_does_not_import_edgelb() -> None:
    code = ("import sys, watchers.file; "
            "bad = [m for m in sys.modules if m == 'edgelb' or m.startswith('edgelb.')]; "
            "assert not bad, bad")
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
