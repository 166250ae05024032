"""The shared per-client limits table (edgelb/workers/shared_limits.py), and ClientLimiter with
one view per "worker" in one process: the table's arithmetic, and the group bound."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelb.http.client_limits import (
    ADMITTED,
    RATE_LIMITED,
    TOO_MANY_CONNECTIONS,
    ClientLimiter,
)
from edgelb.http.router import Router
from edgelb.workers.shared_limits import (
    CELL_WORDS,
    LimitsView,
    SharedLimits,
    cell_index,
    identity,
)
from watchers.model import ClientLimits, Filters, Route

IP = b"\x7f\x00\x00\x01"


@contextmanager
def group(workers: int, cells: int = 1024) -> Iterator[tuple[SharedLimits, list[LimitsView]]]:
    shared = SharedLimits.create(workers, cells)
    views = [SharedLimits.attach(shared.handle(), w) for w in range(workers)]
    try:
        yield shared, views
    finally:
        for v in views:
            v.close()
        shared.close()


def test_the_cell_of_a_client_is_the_same_in_every_process():
    limits = ClientLimits(rps=5.0, burst=10, connections=4, exempt=("10.0.0.0/8",))
    ident = identity("routes[0]", limits)
    here = [cell_index(ident, bytes([10, 0, 0, i]), 65536) for i in range(20)]
    code = ("from edgelb.workers.shared_limits import identity, cell_index\n"
            "from watchers.model import ClientLimits\n"
            "i = identity('routes[0]', ClientLimits(rps=5.0, burst=10, connections=4, "
            "exempt=('10.0.0.0/8',)))\n"
            "print([cell_index(i, bytes([10, 0, 0, n]), 65536) for n in range(20)])")
    for seed in ("1", "2"):  # Python's own hash() would differ between these
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True, timeout=30)
        assert out.stdout.strip() == str(here)
    assert len(set(here)) > 15  # spread, not one cell
    # another route, or the same route with other limits, is another limiter
    assert identity("routes[1]", limits) != ident
    assert identity("routes[0]", ClientLimits(rps=6.0)) != ident


def test_create_checks_its_sizes_and_attach_its_table(tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        SharedLimits.create(2, 1000)
    with pytest.raises(ValueError, match="workers must be"):
        SharedLimits.create(0)
    with group(2) as (shared, _):
        with pytest.raises(ValueError, match="no worker 2"):
            SharedLimits.attach(shared.handle(), 2)
        path = shared.handle().path
        assert os.path.exists(path)
    assert not os.path.exists(path)  # gone with the group


def test_reset_zeroes_a_dead_workers_in_flight_only():
    with group(2) as (shared, (a, b)):
        a.add_inflight(7, 3)
        b.add_inflight(7, 2)
        a.bucket(7, 1.0, 1.0, 5.0)
        a.take(7, 4.0, 1.0)
        assert shared.inflight(7) == 5 and shared.admitted(7) == 1
        shared.reset_worker(0)
        assert shared.inflight(7) == 2  # b's are still open
        assert shared.admitted(7) == 1  # a's admission happened: the bucket still knows it
        assert b.bucket(7, 1.0, 1.0, 5.0) == 4.0
        with pytest.raises(ValueError, match="no worker 5"):
            shared.reset_worker(5)


ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7), st.sampled_from("+-t")),
               max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_sums_are_the_per_worker_counts(steps):
    with group(3, 8) as (shared, views):
        inflight = [[0] * 8 for _ in range(3)]
        taken = [[0] * 8 for _ in range(3)]
        for w, cell, op in steps:
            if op == "+":
                views[w].add_inflight(cell, 1)
                inflight[w][cell] += 1
            elif op == "-" and inflight[w][cell]:
                views[w].add_inflight(cell, -1)
                inflight[w][cell] -= 1
            elif op == "t":
                views[w].bucket(cell, 1.0, 1.0, 100.0)
                views[w].take(cell, 0.0, 1.0)
                taken[w][cell] += 1
        for cell in range(8):
            assert shared.inflight(cell) == sum(inflight[w][cell] for w in range(3))
            assert shared.admitted(cell) == sum(taken[w][cell] for w in range(3))
        for w in range(3):  # each worker wrote its own cells only
            base = views[w].own
            assert [shared.words[base + c * CELL_WORDS] for c in range(8)] == inflight[w]


# -- ClientLimiter with one view per worker ---------------------------------------------------


def limiters(views: list[LimitsView], **kw: float) -> list[ClientLimiter]:
    limits = ClientLimits(**kw)  # type: ignore[arg-type]
    return [ClientLimiter(limits, v, "routes[0]") for v in views]


@pytest.mark.parametrize("workers", [2, 3])
def test_a_burst_split_over_the_workers_gets_the_burst_once(workers):
    with group(workers) as (_, views):
        group_limiters = limiters(views, rps=1.0, burst=10)
        verdicts = [group_limiters[i % workers].admit(IP, 100.0) for i in range(40)]
        assert verdicts.count(ADMITTED) == 10  # one after another: exactly the burst
        assert set(verdicts[10:]) == {RATE_LIMITED}
        assert all(lim.retry_after(IP) == 1 for lim in group_limiters)
        # the refill is the group's too: 3 s later 3 more, whichever worker asks
        later = [group_limiters[i % workers].admit(IP, 103.0) for i in range(10)]
        assert later.count(ADMITTED) == 3
        # another client has its own bucket
        assert group_limiters[0].admit(b"\x7f\x00\x00\x02", 103.0) == ADMITTED


def test_a_client_moving_to_a_worker_that_never_saw_it_does_not_get_a_new_burst():
    with group(2) as (_, views):
        a, b = limiters(views, rps=1.0, burst=5)
        assert [a.admit(IP, 10.0) for _ in range(5)] == [ADMITTED] * 5
        assert b.admit(IP, 10.5) == RATE_LIMITED  # b meets the client with the group's bucket
        assert b.retry_after(IP) == 1
        # admissions seen late are not charged after the refill: an idle worker does not
        # limit a client that kept within its rate
        assert b.admit(IP, 20.0) == ADMITTED


def test_without_a_view_each_worker_has_its_own_bucket():
    limits = ClientLimits(rps=1.0, burst=10)
    alone = [ClientLimiter(limits), ClientLimiter(limits)]
    verdicts = [alone[i % 2].admit(IP, 100.0) for i in range(40)]
    assert verdicts.count(ADMITTED) == 20  # what the group view prevents


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_deciding_on_one_picture_go_over_by_at_most_w_minus_1_and_repay_it(workers):
    """The race, made by hand: every worker reads the bucket before any writes."""
    with group(workers) as (shared, views):
        burst, rate = 4.0, 1.0
        now = 50.0
        total = 0
        over = 0.0  # the most the group was beyond the bucket's allowance
        for step in range(40):
            now += 0.25
            pictures = [v.bucket(9, now, rate, burst) for v in views]  # all read first
            for v, tokens in zip(views, pictures, strict=True):
                if tokens >= 1.0:  # then each writes, on the picture it read
                    v.take(9, tokens - 1.0, now)
                    total += 1
            # at any time: within the bucket's allowance plus the W - 1 of one instant
            over = max(over, total - (burst + rate * (now - 50.0)))
            assert over <= workers - 1, (step, total)
        assert over > 0  # the race is real: the bound is reached, not only stated
        assert shared.admitted(9) == total


def test_connections_are_the_groups():
    with group(2) as (shared, views):
        a, b = limiters(views, connections=3)
        assert [a.admit(IP, 1.0), b.admit(IP, 1.0), a.admit(IP, 1.0)] == [ADMITTED] * 3
        assert b.admit(IP, 1.0) == TOO_MANY_CONNECTIONS
        assert a.admit(IP, 1.0) == TOO_MANY_CONNECTIONS
        a.release(IP)
        assert b.admit(IP, 1.0) == ADMITTED
        cell = views[0].cell(a.ident, IP)
        assert shared.inflight(cell) == 3
        for lim, n in ((a, 1), (b, 2)):
            for _ in range(n):
                lim.release(IP)
        lim.release(IP)  # one too many (never happens): the count does not go below 0
        assert shared.inflight(cell) == 0


def test_the_router_gives_its_limiters_the_view_and_keeps_them_across_a_reload():
    lim = Filters(limits=ClientLimits(rps=2.0))
    routes = [Route("a.test", "/", "web", name="routes[0]", filters=lim)]
    with group(2) as (_, (view, _other)):
        first = Router(routes, group=view)
        rule = first.match("a.test", "/")
        assert rule is not None and rule.limiter is not None and rule.limiter.group is view
        again = Router(routes, first, group=view).match("a.test", "/")
        assert again is not None and again.limiter is rule.limiter
        alone = Router(routes, first).match("a.test", "/")  # (no view: not the same limiter)
        assert alone is not None and alone.limiter is not None and alone.limiter.group is None


def test_a_bucket_left_half_written_by_a_dead_worker_does_not_stop_a_reader():
    from edgelb.workers.shared_limits import SEQ

    with group(2) as (shared, (a, b)):
        a.bucket(3, 10.0, 1.0, 5.0)
        a.take(3, 4.0, 10.0)
        seq = a.own + 3 * CELL_WORDS + SEQ
        shared.words[seq] += 1  # killed between the two halves of its next write
        assert b.bucket(3, 10.0, 1.0, 5.0) == 4.0  # read as it is, after a few tries
        assert b.bucket(3, 9.0, 1.0, 5.0) == 4.0  # (a clock read a moment earlier: no refill)
        shared.reset_worker(0)
        assert not shared.words[seq] & 1  # whole again, the bucket as it was left
        assert b.bucket(3, 12.0, 1.0, 5.0) == 5.0
