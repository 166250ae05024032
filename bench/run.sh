#!/usr/bin/env bash
# Side-by-side benchmarks: edgelb vs HAProxy vs nginx on 127.0.0.1 (see bench/README.md).
# Entry point of `make bench`. Installs haproxy, nginx and wrk from Debian packages when
# missing, then hands over to bench/bench.py inside a private temp dir that is removed
# (and every process started there stopped) on exit.
#
# Environment: BENCH_DURATION (10s per run), BENCH_ROUNDS (3), BENCH_CONNS (64),
#   BENCH_TCP_CONNS (8), BENCH_IDLE_CONNS (5000), BENCH_WARMUP (2 seconds, 0 = none),
#   BENCH_PROXIES (edgelb,haproxy,nginx), BENCH_SCENARIOS (http,tcp,idle),
#   BENCH_RESULTS (bench/results), BENCH_EDGELB_PYTHON (the repo's .venv python).
#   BENCH_ACCESS_LOG (json or combined: edgelb logs every request to a file; off by default).
#   BENCH_SCRIPT (bench.py): the bench to run, e.g. workers_bench.py (make bench-workers).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

log() { printf '%s\n' "bench: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else log "need root to run: $* (install haproxy, nginx and wrk yourself)"; return 1
    fi
}

# Stop a daemon that a package's postinst may have started, by the pid in its pid file.
stop_packaged_daemon() {
    local pidfile="$1" pid
    [ -r "$pidfile" ] || return 0
    pid="$(head -n1 "$pidfile" | tr -dc 0-9)"
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the daemon the package started (pid $pid from $pidfile)"
        as_root kill "$pid" 2>/dev/null || true
    fi
}

install_tools() {
    local missing=() t
    for t in haproxy nginx wrk; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]} (haproxy nginx wrk) from Debian packages"
    # keep the packages' init scripts from starting system daemons during the install
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        made_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
        haproxy nginx wrk)
    if ! as_root "${apt[@]}"; then
        log "install failed; refreshing the package lists once and retrying"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        as_root "${apt[@]}"
    fi
    [ "$made_policy" -eq 1 ] && as_root rm -f /usr/sbin/policy-rc.d
    stop_packaged_daemon /run/nginx.pid
    stop_packaged_daemon /run/haproxy.pid
}

install_tools

# 5000 idle connections need fds on both ends; take what the hard limit allows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open file limit: $(ulimit -n)"

python="${BENCH_EDGELB_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export BENCH_EDGELB_PYTHON="$python"

BENCH_TMP="$(mktemp -d -t edgelb-bench.XXXXXX)"
export BENCH_TMP
export BENCH_RESULTS="${BENCH_RESULTS:-$here/results}"

bench_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
        kill -TERM "$bench_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$bench_pid" 2>/dev/null || true
    fi
    # bench.py stops its children itself; should it have been killed first, each child it
    # started leads its own process group, listed in the pid file. Kill a group only while
    # a member still runs with this temp dir on its command line (no reused pids).
    if [ -f "$BENCH_TMP/pids" ]; then
        while read -r pid; do
            [ -n "$pid" ] || continue
            if pgrep -g "$pid" -f "$BENCH_TMP" >/dev/null 2>&1; then
                kill -KILL -- "-$pid" 2>/dev/null || true
            fi
        done <"$BENCH_TMP/pids"
    fi
    rm -rf "$BENCH_TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$python" "$here/${BENCH_SCRIPT:-bench.py}" &
bench_pid=$!
wait "$bench_pid"
