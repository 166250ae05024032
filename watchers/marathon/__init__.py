"""The Marathon (Mesos) watcher: follows Marathon's apps and event stream and hands the proxy
whole snapshots, as marathon-lb did with HAProxy configs, without reloads."""
