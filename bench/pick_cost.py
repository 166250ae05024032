"""Microseconds per pick, per policy, for pools of 10, 100 and 1000 backends.

Run from the repo root: `.venv/bin/python bench/pick_cost.py`. Pools have mixed weights (1-4),
latencies (5-60 ms) and in-flight counts (0-8); `hash` picks with a key. P2C policies
(least-loaded, peak-ewma, and hash without a key) stay flat as the pool grows; round-robin and
least-connections scan the pool, O(n). Prints a markdown table.
"""

from __future__ import annotations

import random
import sys
import timeit
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import balancers

SIZES = (10, 100, 1000)


@dataclass(eq=False)
class Backend:
    weight: float
    inflight: int
    latency: float
    eligible: bool = True
    cap: int = 0
    zone: str = ""
    key: str = ""


def make_pool(n: int, rng: random.Random) -> list[Backend]:
    return [Backend(weight=float(rng.randint(1, 4)), inflight=rng.randint(0, 8),
                    latency=rng.uniform(0.005, 0.06), key=f"10.0.{i // 250}.{i % 250}:80")
            for i in range(n)]


def cost_us(name: str, n: int, number: int) -> float:
    rng = random.Random(n)
    backends = make_pool(n, rng)
    policy = balancers.make(name, random.Random(1))
    policy.reset(backends)
    keys = [rng.randbytes(8) for _ in range(256)] if name == "hash" else [None] * 256
    state = {"i": 0}

    def one() -> None:
        i = state["i"] = (state["i"] + 1) & 255
        policy.pick(backends, keys[i])

    one()  # build lazily built tables outside the timing
    best = min(timeit.repeat(one, number=number, repeat=3))
    return best / number * 1e6


def main() -> None:
    names = sorted(balancers.POLICIES, key=lambda n: (n != balancers.DEFAULT, n))
    print("| policy | " + " | ".join(f"{n} backends (µs/pick)" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for name in names:
        cells = []
        for n in SIZES:
            number = 20000 if n <= 100 else 3000
            cells.append(f"{cost_us(name, n, number):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
