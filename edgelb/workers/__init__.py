"""Many worker processes, one proxy: the process model (issue 19) and the shared view of load
(`shared_load`: per-backend in-flight and latency estimates shared between the workers)."""
