"""The control plane: the runtime (the one door that applies snapshots), health
checks and the supervised background tasks.

See ARCHITECTURE.md."""
