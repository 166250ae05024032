"""Sources of truth. Each watcher emits whole, immutable Snapshots (see watchers.model)."""
