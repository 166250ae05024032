"""Two real worker processes, each with its own Runtime and listener, in front of one backend
with a cap: with the shared load table, a burst over the cap never puts more than
cap + workers - 1 requests on the backend at once (the bound in edgelb/workers/shared_load.py),
counted by the backend itself; without it, each worker fills the cap on its own."""

from __future__ import annotations

import asyncio
import multiprocessing

from httpkit import Call, Client, HttpBackend, free_port, service, snapshot, within

from edgelb.workers.shared_load import SharedLoad, SharedLoadHandle

WORKERS = 2
CAP = 3
BURST = 24  # requests sent to each worker at once
HOLD = 0.08  # seconds the backend works on each request


class Concurrency:
    """The backend's own count of the requests it serves at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.served = 0

    async def __call__(self, call: Call) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(HOLD)  # the backend's service time
        finally:
            self.now -= 1
        self.served += 1
        await call.respond(200, b"done")


def _serve(handle: SharedLoadHandle | None, worker: int, listen: int, backend_port: int,
           conn) -> None:
    """A worker process: a Runtime serving `listen` in front of the backend (the group's
    load read from `handle` when given), until the parent says stop."""
    import uvloop

    from edgelb.control.runtime import Runtime
    from watchers.model import Backend, Settings

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runtime = Runtime(loop=loop, settings=Settings(grace=1.0))
        if handle is not None:
            runtime.use_shared_load(SharedLoad.attach(handle, worker))
        snap = snapshot(service("s", [Backend("127.0.0.1", backend_port)], listen=listen,
                                max_inflight=CAP, queue_timeout=20.0))
        await runtime.apply(snap)
        runtime.start_sweeper()
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)
        conn.send("ready")
        await stop.wait()
        loop.remove_reader(conn.fileno())
        pool = runtime.services["s"].pool
        assert conn.recv() == "stop"
        conn.send({"own": sum(b.own for b in pool.backends), "sharing": pool.sharing})
        await runtime.shutdown(0.2)

    uvloop.run(main())


async def _burst(shared: bool) -> tuple[Concurrency, list[int], SharedLoad, str]:
    work = Concurrency()
    backend = await HttpBackend("b", work).start()
    table = SharedLoad.create(WORKERS, 16)
    table.assign([backend.spec.key])
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no loop inherited
    ports = [free_port() for _ in range(WORKERS)]
    procs, conns = [], []
    try:
        for w, port in enumerate(ports):
            ours, theirs = ctx.Pipe()
            handle = table.handle() if shared else None
            proc = ctx.Process(target=_serve, args=(handle, w, port, backend.address.port,
                                                    theirs), daemon=True)
            proc.start()
            procs.append(proc)
            conns.append(ours)
        loop = asyncio.get_running_loop()
        for conn in conns:
            ready = await within(loop.run_in_executor(None, conn.poll, 30), 35)
            assert ready and conn.recv() == "ready"

        async def get(port: int) -> int:
            client = await Client.open(port)
            try:
                return (await client.request("GET", "/")).status
            finally:
                client.close()

        statuses = await within(asyncio.gather(
            *(get(port) for _ in range(BURST) for port in ports)), 30)
        for conn in conns:
            conn.send("stop")
        reports = [await within(loop.run_in_executor(None, c.recv), 10) for c in conns]
        assert all(r == {"own": 0, "sharing": shared} for r in reports), reports
        for proc in procs:
            await within(loop.run_in_executor(None, proc.join, 10), 15)
            assert proc.exitcode == 0
        return work, statuses, table, backend.spec.key
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        await backend.stop()


async def test_with_the_shared_table_a_burst_over_the_cap_stays_within_the_bound():
    work, statuses, table, key = await _burst(shared=True)
    try:
        assert statuses == [200] * (BURST * WORKERS)  # queued for the group's slots, none shed
        assert work.served == BURST * WORKERS
        assert CAP <= work.peak <= CAP + WORKERS - 1, work.peak
        slot = table.slot_of(key)
        assert slot is not None and table.total(slot) == 0  # every slot given back
    finally:
        table.close()


async def test_without_it_each_worker_fills_the_cap_alone():
    work, statuses, table, _ = await _burst(shared=False)
    table.close()
    assert statuses == [200] * (BURST * WORKERS)
    assert work.peak > CAP + WORKERS - 1  # here, WORKERS x CAP: the test can tell
