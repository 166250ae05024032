"""Many worker processes, one proxy: the process model (issue 19) and the shared views
(`shared_load`: per-backend in-flight and latency estimates shared between the workers;
`shared_limits`: routes' per-client limits counted for the group)."""
