"""An adaptive concurrency cap for one backend: a gradient controller on observed latency.

In the spirit of Netflix's Gradient2 and Envoy's adaptive concurrency, for a proxy that calls
`sample()` once per completed request and reads `limit`:

* Samples add into a *window*: a sum, a count and the peak in-flight (no allocation). A window
  closes at the first sample once it has MIN_SAMPLES and has lasted
  `max(MIN_WINDOW, WINDOW_RTTS x the last window's mean latency)` (at most MAX_WINDOW), or at
  MAX_SAMPLES whatever the clock says (a clock that goes backwards cannot stall it). Spanning
  two round trips, a window sees the effect of the previous change before making the next.
* At the close, `short` = the window's mean latency, `long` = the no-load baseline,
  `gradient = clamp(TOLERANCE * long / short, 0.5, 1.0)`, and the limit moves toward
  `limit * gradient + queue`, `queue = min(sqrt(limit), limit / 4)` (a small queue at the
  backend keeps it busy; `limit / 4` keeps small limits within 2x capacity), by SMOOTH_UP of
  the way when that is higher, SMOOTH_DOWN when lower, within [min_limit, max_limit]. It only
  grows when the window's peak in-flight came within one of it: app-limited traffic, which
  never fills the cap, cannot inflate it.
* Drift guard: the baseline follows a lower window down (BASELINE_DOWN of the way) but never
  follows a higher one up, since a slow window is what overload looks like and following it
  would let the baseline rise with the very queue it must detect. It is only raised by a
  *measurement*: a window run at `min_limit` (nothing left to shed), or a probe.
* A probe (every PROBE_INTERVAL, jittered; at once when a window comes in STALE below the
  baseline; and a few windows after the start) halves the concurrency in use and measures a
  window there (PROBE_SAMPLES at least, after the requests from before it have drained). If
  the baseline was verified before and this agrees with it within CONFIRM, that is it (the
  baseline may come down, not up). Otherwise, if halving cut the latency by PROBE_RATIO or
  more, that latency was queueing and the halved level may still be above capacity: it halves
  again, and so on until halving stops helping. That last measurement is the new (verified)
  baseline, and the limit resumes where it was (one halving) or at twice the last level that
  halving did not help (deeper: the first level found over capacity, by at most about 2x); the
  gradient takes over from there. A settled limit is at most about 2x capacity, so one halving
  lands at or below capacity and the probe costs a window or two at about C/2..C.
* `failure()` (a timeout, reset or 5xx) halves the limit, at most once per window span.

Garbage (NaN, infinite or negative latencies) spoils only the window it lands in: that window is
dropped. Where it settles (tests/test_limits.py simulates a backend of capacity C under a closed
loop of 10C+20 clients): exactly 2C for C = 2 and 8 and 1.7C for C = 32 with fixed service
times; with exponential ones (the noisiest), pooled quartiles of 1.5C..2C (C = 2),
1.75C..2.1C (C = 8) and 1.5C..1.8C (C = 32), about 2% of the time below C (probes).
"""

from __future__ import annotations

import math
import random

MIN_WINDOW = 0.1  # seconds: the shortest window
MAX_WINDOW = 5.0  # seconds: the longest window, however slow the backend
WINDOW_RTTS = 2.0  # a window spans at least this many of the last window's mean latency
MIN_SAMPLES = 10  # a window needs this many samples (fewer are noise)
PROBE_SAMPLES = 30  # a probe window needs this many (its verdict moves the baseline)
MAX_SAMPLES = 10_000  # a window closes at this many samples whatever the clock says
TOLERANCE = 1.5  # latency up to this many times the baseline is not overload
SMOOTH_UP = 0.5  # share of the way to a higher target taken per window
SMOOTH_DOWN = 0.75  # share of the way to a lower target taken per window
BASELINE_DOWN = 0.25  # share of the way the baseline follows a lower window mean
STALE = 0.75  # a window this far below the baseline starts a probe at once
PROBE_INTERVAL = 30.0  # seconds between probes that re-measure the baseline
PROBE_JITTER = 0.25  # probes come PROBE_INTERVAL x (1 + up to this share) apart
PROBE_FIRST = 5  # windows before the first probe
PROBE_RATIO = 1.25  # a probe halves again while halving cuts the latency by this factor
CONFIRM = 1.25  # a probe within this factor of the baseline confirms it at once
PROBE_DISCARDS = 3  # probe windows dropped at most while requests from before it drain
FAILURE_DECREASE = 0.5  # a failure multiplies the limit by this
RTT_FLOOR = 1e-6  # seconds: latencies below this count as this (no division by zero)

_INF = math.inf


class GradientLimit:
    """The adaptive concurrency cap of ONE backend. Read `limit`; feed `sample()`/`failure()`.

    `now` is any monotonic clock in seconds (it is never read here); `rng` only jitters the
    probe schedule so that backends added together do not probe together.
    """

    __slots__ = (
        "_count",
        "_depth",
        "_discards",
        "_due",
        "_last_cut",
        "_long",
        "_need",
        "_peak",
        "_probe_at",
        "_resume",
        "_rng",
        "_saved",
        "_short",
        "_span",
        "_sum",
        "_value",
        "_verified",
        "limit",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        initial: int,
        min_limit: int = 1,
        max_limit: int = 1000,
        rng: random.Random | None = None,
    ) -> None:
        if min_limit < 1:
            raise ValueError(f"GradientLimit min_limit must be >= 1, got {min_limit}")
        if max_limit < min_limit:
            raise ValueError(
                f"GradientLimit max_limit ({max_limit}) must be >= min_limit ({min_limit})"
            )
        self.min_limit = min_limit
        self.max_limit = max_limit
        self._value = float(min(max(initial, min_limit), max_limit))  # the limit, unrounded
        self.limit = int(self._value)  # the cap the proxy enforces
        self._rng = rng
        self._long = 0.0  # the no-load latency baseline; 0.0 = not measured yet
        self._probe_at = _INF  # when the next probe starts (set by the first window)
        self._short = 0.0  # the last window's mean latency
        self._depth = 0  # 0: not probing; n: at the n-th halving of a probe
        self._discards = 0  # windows of this probe level dropped while older requests drain
        self._resume = 0.0  # during a probe: the limit when it started
        self._saved = 0.0  # during a probe: the level the current one halved
        self._verified = False  # the baseline was measured where halving no longer helped
        self._last_cut = -_INF  # when a failure last cut the limit
        self._span = MIN_WINDOW
        self._need = MIN_SAMPLES  # samples the open window needs before it may close
        self._open(-_INF)

    def _open(self, now: float) -> None:
        self._sum = 0.0
        self._count = 0
        self._peak = 0
        self._due = now + self._span

    # -- the hot path ------------------------------------------------------------------------

    def sample(self, rtt: float, now: float, inflight: int) -> bool:
        """One request completed after `rtt` seconds with `inflight` requests on the backend
        (counting it or not: either is fine if consistent). True when `limit` changed."""
        self._sum += rtt
        n = self._count = self._count + 1
        if inflight > self._peak:
            self._peak = inflight
        if n < self._need or (now < self._due and n < MAX_SAMPLES):
            return False
        return self._close(now)

    def failure(self, now: float) -> bool:
        """A timeout, reset or 5xx: halve the limit (at most once per window span).
        True when `limit` changed."""
        since = now - self._last_cut
        if -self._span < since < self._span:
            return False
        self._last_cut = now
        if self._depth:
            # the probe level is already low; what the probe resumes at comes down instead
            self._resume *= FAILURE_DECREASE
            return False
        return self._set(self._value * FAILURE_DECREASE)

    # -- once per window ---------------------------------------------------------------------

    def _set(self, value: float) -> bool:
        if value < self.min_limit:
            value = float(self.min_limit)
        elif value > self.max_limit:
            value = float(self.max_limit)
        self._value = value
        old = self.limit
        self.limit = int(value + 0.5)
        return self.limit != old

    def _close(self, now: float) -> bool:
        short = self._sum / self._count
        peak = self._peak
        if not 0.0 <= short < _INF:  # NaN, inf or negative: drop the window
            self._open(now)
            return False
        if short < RTT_FLOOR:
            short = RTT_FLOOR
        span = WINDOW_RTTS * short
        if span < MIN_WINDOW:
            span = MIN_WINDOW
        elif span > MAX_WINDOW:
            span = MAX_WINDOW
        self._span = span
        self._open(now)
        if self._depth:
            return self._probe_window(short, peak, now)
        self._short = short
        long = self._long
        if long <= 0.0:
            long = self._long = short  # the first window: may be all queue, not verified
            self._probe_at = now + PROBE_FIRST * span  # so the first probe comes soon
        elif self.limit <= self.min_limit:
            long = self._long = short  # measured with nothing left to shed
            self._verified = True
        elif short < long:
            if short < STALE * long:
                self._probe_at = now  # far below the baseline: it is stale, re-measure now
            long = self._long = long + BASELINE_DOWN * (short - long)
        if now >= self._probe_at:
            return self._start_probe(peak)
        value = self._value
        gradient = TOLERANCE * long / short
        if gradient > 1.0:
            gradient = 1.0
        elif gradient < 0.5:
            gradient = 0.5
        queue = math.sqrt(value)
        if queue * 4.0 > value:
            queue = value / 4.0
        target = value * gradient + queue
        if target > value:
            if peak + 1 < self.limit:
                return False  # not using what it has: no reason to give it more
            if gradient == 1.0 and target < value + 1.0:
                target = value + 1.0  # no sign of queueing: small limits grow too
            return self._set(value + SMOOTH_UP * (target - value))
        return self._set(value + SMOOTH_DOWN * (target - value))

    # -- probes: re-measuring the no-load baseline --------------------------------------------

    def _start_probe(self, used: int) -> bool:
        """Halve the concurrency actually used (a limit far above it would change nothing)."""
        self._depth = 1
        self._discards = 0
        self._need = PROBE_SAMPLES
        level = self._resume = self._value
        if used < level:
            level = used if used > self.min_limit else self.min_limit
        self._saved = level
        return self._set(level * 0.5)

    def _probe_window(self, short: float, peak: int, now: float) -> bool:
        if peak > self.limit and self._discards < PROBE_DISCARDS:
            self._discards += 1  # requests sent before the probe are still completing
            return False
        before = self._short  # the latency at the level this probe halved
        previous = self._long
        self._short = self._long = short
        if (
            self._depth == 1
            and self._verified
            and previous <= short * CONFIRM
            and short <= previous * CONFIRM
        ):
            # a verified baseline is confirmed (within the noise); it may only come down here,
            # so that noise cannot walk it up from probe to probe
            if previous < short:
                self._long = previous
        elif before >= PROBE_RATIO * short and self.limit > self.min_limit:
            # halving the concurrency cut the latency by PROBE_RATIO or more: that was
            # queueing, so the level measured here may be above capacity too; halve again
            self._depth += 1
            self._discards = 0
            self._saved = self._value
            return self._set(self._value * 0.5)
        else:
            # halving changed little: the level above this one was within capacity (and the
            # one above that, if this probe went that deep, over it by no more than 2x)
            self._verified = True
        resume = self._resume if self._depth == 1 else min(self._resume, 2.0 * self._saved)
        self._depth = 0
        self._need = MIN_SAMPLES
        jitter = self._rng.random() * PROBE_JITTER if self._rng is not None else 0.0
        self._probe_at = now + PROBE_INTERVAL * (1.0 + jitter)
        return self._set(resume)
