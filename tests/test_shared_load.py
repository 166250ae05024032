"""The shared in-flight table (edgelb/workers/shared_load.py) and the pools that read it: slots
stable across snapshots, reused only when safe, a dead worker's cells reset, a view attached
from another process, group sums, caps and latency estimates shared between workers."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelb.pool import LATENCY_EVERY, ServiceState
from edgelb.workers.shared_load import (
    KEY_MAX,
    SharedLoad,
    SharedLoadHandle,
    SlotsExhausted,
    WorkerView,
)
from watchers.model import Backend, Policy, Service

KEYS = [f"10.0.0.{i}:80" for i in range(1, 9)]


@pytest.fixture
def table():
    shared = SharedLoad.create(workers=3, slots=4, settle=1.0, grace=60.0)
    yield shared
    shared.close()


def add(view: WorkerView, slot: int, n: int) -> None:
    """What a worker's pool does on acquire (n > 0) and release (n < 0)."""
    view.words[view.cell(view.worker, slot)] += n


def test_a_key_keeps_its_slot_while_present_and_a_new_key_takes_a_never_used_one(table):
    table.assign(KEYS[:3], now=0.0)
    first = {k: table.slot_of(k) for k in KEYS[:3]}
    assert sorted(first.values()) == [0, 1, 2]
    table.assign([KEYS[2], KEYS[0], KEYS[3]], now=1.0)  # order does not matter
    assert table.slot_of(KEYS[0]) == first[KEYS[0]]
    assert table.slot_of(KEYS[2]) == first[KEYS[2]]
    assert table.slot_of(KEYS[1]) is None  # retired
    assert table.slot_of(KEYS[3]) == 3  # the never-used slot, not the retired one
    view = SharedLoad.attach(table.handle(), 1)
    try:  # a worker reads the same directory
        assert [view.slot(k) for k in KEYS[:4]] == [first[KEYS[0]], -1, first[KEYS[2]], 3]
    finally:
        view.close()


def test_a_retired_slot_is_reused_only_when_it_reads_zero_after_settle_or_after_grace(table):
    view = SharedLoad.attach(table.handle(), 2)
    try:
        table.assign(KEYS[:4], now=0.0)
        gone = table.slot_of(KEYS[1])
        add(view, gone, 1)  # worker 2 still has a request on it
        table.assign([KEYS[0], KEYS[2], KEYS[3]], now=10.0)
        with pytest.raises(SlotsExhausted, match=r"4 slots.*more slots"):
            table.assign([KEYS[0], KEYS[2], KEYS[3], KEYS[4]], now=15.0)  # not zero
        assert table.slot_of(KEYS[4]) is None and table.slot_of(KEYS[0]) == 0  # no change
        add(view, gone, -1)
        with pytest.raises(SlotsExhausted):
            table.assign([KEYS[0], KEYS[2], KEYS[3], KEYS[4]], now=10.5)  # zero, not settled
        table.assign([KEYS[0], KEYS[2], KEYS[3], KEYS[4]], now=11.0)
        assert table.slot_of(KEYS[4]) == gone
        assert view.slot(KEYS[4]) == gone and view.slot(KEYS[1]) == -1

        # a request stuck on a removed backend holds its slot until the grace is over
        stuck = table.slot_of(KEYS[2])
        add(view, stuck, 1)
        table.assign([KEYS[0], KEYS[3], KEYS[4]], now=20.0)
        with pytest.raises(SlotsExhausted):
            table.assign([KEYS[0], KEYS[3], KEYS[4], KEYS[5]], now=79.0)
        table.assign([KEYS[0], KEYS[3], KEYS[4], KEYS[5]], now=80.0)
        assert table.slot_of(KEYS[5]) == stuck
    finally:
        view.close()


def test_a_key_that_comes_back_before_its_slot_is_reused_gets_it_again(table):
    table.assign(KEYS[:2], now=0.0)
    slot = table.slot_of(KEYS[1])
    table.assign(KEYS[:1], now=1.0)
    table.assign([KEYS[0], KEYS[2]], now=5.0)  # a never-used slot for the new key
    table.assign([KEYS[0], KEYS[2], KEYS[1]], now=6.0)
    assert table.slot_of(KEYS[1]) == slot


def test_more_keys_than_slots_is_a_clear_error_and_long_keys_are_stored_by_digest(table):
    with pytest.raises(SlotsExhausted, match="4 slots and this snapshot needs 5 backend keys"):
        table.assign(KEYS[:5], now=0.0)
    assert all(table.slot_of(k) is None for k in KEYS)
    long_a, long_b = "a" * KEY_MAX + ":1", "a" * KEY_MAX + ":2"
    table.assign([long_a, long_b], now=0.0)
    assert table.slot_of(long_a) != table.slot_of(long_b)
    view = SharedLoad.attach(table.handle(), 0)
    try:
        assert view.slot(long_b) == table.slot_of(long_b)
    finally:
        view.close()


def test_reset_worker_zeroes_that_workers_cells_only(table):
    table.assign(KEYS[:4], now=0.0)
    views = [SharedLoad.attach(table.handle(), w) for w in range(3)]
    try:
        for w, view in enumerate(views):
            for slot in range(4):
                add(view, slot, w + slot + 1)
                view.floats[view.cell(w, slot) + 1] = 0.5  # a latency estimate
                view.floats[view.cell(w, slot) + 2] = 100.0 + w
        table.reset_worker(1)
        for slot in range(4):
            assert [table.inflight(w, slot) for w in range(3)] == [slot + 1, 0, slot + 3]
            assert table.latency(slot) == (0.5, 102.0)
        with pytest.raises(ValueError, match="no worker 3"):
            table.reset_worker(3)
    finally:
        for view in views:
            view.close()


def _worker(handle: SharedLoadHandle, worker: int, keys: list[str], out) -> None:
    """In another process: attach, find the slots, and add one request per key."""
    view = SharedLoad.attach(handle, worker)
    slots = [view.slot(k) for k in keys]
    for slot in slots:
        view.words[view.cell(worker, slot)] += 1
    out.send((os.getpid(), slots))
    view.close()


def test_a_view_attached_in_another_process_finds_the_slots_and_its_counts_add_up(table):
    table.assign(KEYS[:3], now=0.0)
    ctx = multiprocessing.get_context("spawn")  # nothing inherited: only the handle
    results = []
    for worker in (0, 2):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(table.handle(), worker, KEYS[:3], send))
        proc.start()
        assert recv.poll(20), "the worker process did not answer"
        results.append(recv.recv())
        proc.join(10)
        assert proc.exitcode == 0
    expected = [table.slot_of(k) for k in KEYS[:3]]
    assert all(slots == expected and pid != os.getpid() for pid, slots in results)
    assert [table.total(s) for s in expected] == [2, 2, 2]
    assert [table.inflight(1, s) for s in expected] == [0, 0, 0]
    assert os.path.exists(table.handle().path)  # the workers' exits did not remove it


def _create_and_exit(directory: str, out) -> None:
    shared = SharedLoad.create(workers=2, slots=2, directory=directory)
    out.send(shared.handle().path)  # and exit without closing it


def test_the_table_is_removed_when_its_process_exits_without_closing_it(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_create_and_exit, args=(str(tmp_path), send))
    proc.start()
    assert recv.poll(20), "the process did not answer"
    path = recv.recv()
    proc.join(10)
    assert proc.exitcode == 0
    assert path.startswith(str(tmp_path)) and not os.path.exists(path)


def test_the_table_is_removed_on_close_and_a_bad_handle_is_refused(tmp_path):
    shared = SharedLoad.create(workers=2, slots=2, directory=str(tmp_path))
    path = shared.handle().path
    assert os.path.exists(path)
    shared.close()
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        SharedLoad.attach(SharedLoadHandle(path, 2, 2), 0)
    bogus = tmp_path / "bogus"
    bogus.write_bytes(bytes(1 << 16))
    with pytest.raises(ValueError, match="not an edgelb shared load table"):
        SharedLoad.attach(SharedLoadHandle(str(bogus), 2, 2), 0)


# -- pools that read the table ---------------------------------------------------------------


def _service(cap: int | None = None, balance: str = "least-loaded") -> Service:
    backends = tuple(Backend("10.0.0.1", 80 + i) for i in range(3))
    return Service("s", backends=backends, policy=Policy(balance=balance, max_inflight=cap))


def _group(shared: SharedLoad, svc: Service) -> list[ServiceState]:
    shared.assign([b.key for b in svc.backends])
    states = []
    for w in range(shared.workers):
        state = ServiceState(svc)
        state.pool.use_shared(SharedLoad.attach(shared.handle(), w))
        states.append(state)
    return states


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans()), max_size=60))
def test_the_group_sum_is_the_sum_of_the_workers_counts(ops):
    """Acquires and releases by three workers' pools in any order: the table's sum of a
    backend equals the sum of each worker's own count, and that is what a pool reads."""
    with SharedLoad.create(workers=3, slots=8) as shared:
        states = _group(shared, _service())
        own = {(w, i): 0 for w in range(3) for i in range(3)}
        for w, i, up in ops:
            pool = states[w].pool
            backend = pool.backends[i]
            if up:
                pool.acquire(backend)
                own[w, i] += 1
            elif own[w, i]:
                pool.release(backend)
                own[w, i] -= 1
            for j in range(3):
                assert shared.total(states[0].pool.backends[j].slot) == sum(
                    own[v, j] for v in range(3))
        for w in range(3):
            pool = states[w].pool
            pool.sync()
            for j, b in enumerate(pool.backends):
                assert b.own == own[w, j]
                assert b.inflight == sum(own[v, j] for v in range(3))


def test_a_cap_holds_for_the_group_and_a_release_anywhere_frees_it():
    with SharedLoad.create(workers=2, slots=8) as shared:
        svc = _service(cap=2)
        a, b = (s.pool for s in _group(shared, svc))
        for _ in range(6):  # worker 0 takes every slot of the group: 3 backends x 2
            backend = a.pick()
            assert backend is not None
            a.acquire(backend)
        assert b.pick() is None and b.at_capacity()  # worker 1: wait, not "no backend"
        a.release(a.backends[1])
        freed = b.pick()
        assert freed is not None and freed.key == a.backends[1].key
        b.acquire(freed)
        assert a.pick() is None and b.pick() is None


def test_without_a_view_each_pool_counts_alone():
    svc = _service(cap=2)
    a, b = ServiceState(svc).pool, ServiceState(svc).pool
    for _ in range(6):
        a.acquire(a.pick())
    assert b.pick() is not None  # a single process sees only its own load
    assert not a.sharing and all(x.own == 0 and x.slot == -1 for x in a.backends)


def test_least_loaded_sees_the_other_workers_load_and_their_latency():
    with SharedLoad.create(workers=2, slots=8) as shared:
        a, b = (s.pool for s in _group(shared, _service(balance="least-loaded")))
        for backend in a.backends:  # equal latency everywhere
            backend.latency, backend.latency_t = 0.010, 1.0
            a.acquire(backend)
            a.release(backend)
        busy = a.backends[0]
        for _ in range(5):
            a.acquire(busy)
        picks = {b.pick().key for _ in range(200)}
        assert busy.key not in picks  # worker 1 never adds to worker 0's busy backend
        # a slow sample on worker 0, published at its release, reaches worker 1's picture
        slow = a.backends[2]
        a.acquire(slow)
        slow.latency, slow.latency_t = 2.0, 5.0
        a.release(slow)
        for _ in range(LATENCY_EVERY + 1):  # read at every LATENCY_EVERY + 1 picks
            b.sync()
        mirror = b.by_key[slow.key]
        assert (mirror.latency, mirror.latency_t) == (2.0, 5.0)
        # the slow one only by the balancer's rare probe of an idle backend (1 pick in 256)
        picks = [b.pick().key for _ in range(50)]
        assert picks.count(b.backends[1].key) >= 45 and busy.key not in picks


def test_a_pool_that_gets_a_view_while_serving_carries_its_open_requests_over():
    with SharedLoad.create(workers=2, slots=8) as shared:
        svc = _service(cap=3)
        shared.assign([x.key for x in svc.backends])
        state = ServiceState(svc)
        pool = state.pool
        pool.acquire(pool.backends[0])
        pool.acquire(pool.backends[0])
        pool.use_shared(SharedLoad.attach(shared.handle(), 1))
        slot = pool.backends[0].slot
        assert shared.inflight(1, slot) == 2 and pool.backends[0].own == 2
        pool.release(pool.backends[0])
        pool.release(pool.backends[0])
        assert shared.total(slot) == 0


def test_a_removed_backend_drains_by_this_workers_own_requests():
    with SharedLoad.create(workers=2, slots=8) as shared:
        svc = _service()
        a, b = (s.pool for s in _group(shared, svc))
        gone = a.backends[0]
        a.acquire(gone)
        b.acquire(b.backends[0])
        b.update(svc.backends[1:], "least-loaded", policy=svc.policy)  # worker 1 drops it
        assert gone.key in b.draining
        b.sync()
        b.release(b.draining[gone.key])
        assert gone.key not in b.draining  # its own count is zero, whatever worker 0 has
        assert shared.total(gone.slot) == 1


def test_the_bound_is_reached_when_every_worker_decides_on_the_same_picture():
    """cap + workers - 1 is tight: three workers each pick while the group has cap - 1 open
    (each sees room for one), then each takes its slot."""
    with SharedLoad.create(workers=3, slots=8) as shared:
        svc = Service("s", backends=(Backend("10.0.0.1", 80),), policy=Policy(max_inflight=2))
        pools = [s.pool for s in _group(shared, svc)]
        pools[0].acquire(pools[0].backends[0])  # cap - 1 open
        picked = [pool.pick() for pool in pools]  # each decides, none has taken it yet
        assert all(p is not None for p in picked)
        for pool, backend in zip(pools, picked, strict=True):
            pool.acquire(backend)
        assert shared.total(pools[0].backends[0].slot) == 2 + 3 - 1
        assert all(pool.pick() is None for pool in pools)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4),
       st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=120))
def test_no_interleaving_of_scans_admissions_and_releases_exceeds_the_bound(workers, cap,
                                                                             steps):
    """The proof in edgelb/workers/shared_load.py, checked on a model of the algorithm where a
    worker's scan reads the other workers' cells one at a time, interleaved with the others'
    steps (as processes on other cores do): admissions never exceed cap + workers - 1."""
    own = [0] * workers
    scan: list[tuple[int, int] | None] = [None] * workers  # (next worker to read, sum so far)
    for who, release in steps:
        w = who % workers
        if release:
            if own[w] and scan[w] is None:  # a release happens between admissions
                own[w] -= 1
            continue
        if scan[w] is None:
            scan[w] = (0, 0)
            continue
        nxt, seen = scan[w]
        if nxt == w:
            nxt += 1
        if nxt < workers:
            scan[w] = (nxt + 1, seen + own[nxt])  # one other worker's cell, read now
            continue
        scan[w] = None  # decided, and committed in the same step of its loop
        if seen + own[w] < cap:
            own[w] += 1
        assert sum(own) <= cap + workers - 1


def test_a_backend_whose_key_got_another_slot_moves_its_open_requests_with_it():
    """After the grace a removed key's slot goes to another key; when the key comes back
    (here to a worker still draining it) its open requests count in its new slot."""
    with SharedLoad.create(workers=2, slots=3, settle=0.0, grace=5.0) as shared:
        svc = Service("s", backends=(Backend("10.0.0.1", 80), Backend("10.0.0.1", 81)))
        shared.assign([b.key for b in svc.backends], now=0.0)
        state = ServiceState(svc)
        pool = state.pool
        pool.use_shared(SharedLoad.attach(shared.handle(), 1))
        kept, moving = pool.backends
        pool.acquire(moving)
        old = moving.slot
        shared.assign([kept.key, "10.0.0.9:80"], now=1.0)  # moving's slot: retired, busy
        pool.update(svc.backends[:1], "least-loaded", policy=svc.policy)
        assert moving.key in pool.draining
        shared.assign([kept.key, "10.0.0.8:80"], now=10.0)  # past the grace: reused
        assert shared.slot_of("10.0.0.8:80") == old
        shared.assign([kept.key, moving.key], now=11.0)
        new = shared.slot_of(moving.key)
        assert new is not None and new != old
        pool.update(svc.backends, "least-loaded", policy=svc.policy)
        assert moving.slot == new
        assert (shared.total(old), shared.total(new)) == (0, 1)
        pool.release(moving)
        assert shared.total(new) == 0


def test_status_and_metrics_show_this_workers_own_count_which_adds_up():
    from edgelb.ops.admin import service_status

    with SharedLoad.create(workers=2, slots=8) as shared:
        states = _group(shared, _service())
        for w, state in enumerate(states):
            for _ in range(w + 1):
                state.pool.acquire(state.pool.backends[0])
        for state in states:
            state.pool.sync()
        status = [service_status(s, ())["backends"][0] for s in states]
        assert [s["inflight"] for s in status] == [1, 2]  # summed by the group: 3
        assert [s["inflight_group"] for s in status] == [3, 3]
    single = ServiceState(_service())
    single.pool.acquire(single.pool.backends[0])
    status = service_status(single, ())["backends"][0]
    assert status["inflight"] == 1 and "inflight_group" not in status


def test_a_killed_controls_tables_are_swept_and_a_living_ones_kept(tmp_path) -> None:
    """A control process killed with SIGKILL cannot remove its /dev/shm files; the next table
    made in that directory removes them (the maker's flock died with it). A living maker's
    table, and any file too young to judge, stay."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from edgelb.workers.shared_limits import SharedLimits
    from edgelb.workers.shared_load import STALE_AGE, sweep_stale

    code = ("import os, signal, sys\n"
            "from edgelb.workers.shared_load import SharedLoad\n"
            "from edgelb.workers.shared_limits import SharedLimits\n"
            "a = SharedLoad.create(2, 8, directory=sys.argv[1])\n"
            "b = SharedLimits.create(2, 64, directory=sys.argv[1])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    dead = sorted(p.name for p in tmp_path.iterdir())
    assert len(dead) == 2 and dead[0].startswith("edgelb-limits-")
    old = time.time() - STALE_AGE - 1
    live = SharedLoad.create(2, 8, directory=str(tmp_path))  # young: nothing swept yet
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*dead, os.path.basename(
        live.handle().path)])
    for p in tmp_path.iterdir():
        os.utime(p, (old, old))
    young = tmp_path / "edgelb-load-1-young"
    young.write_bytes(b"")
    assert sorted(os.path.basename(p) for p in sweep_stale(str(tmp_path))) == dead
    assert {p.name for p in tmp_path.iterdir()} == {young.name,
                                                    os.path.basename(live.handle().path)}
    limits = SharedLimits.create(2, 64, directory=str(tmp_path))  # sweeps too: nothing left
    assert len(list(tmp_path.iterdir())) == 3
    limits.close()
    live.close()
