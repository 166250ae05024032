"""Every core: one control process (watchers, health checks, admin, leader election) and N
data-plane worker processes that apply the snapshots it accepted (`workers: N | auto`)."""
