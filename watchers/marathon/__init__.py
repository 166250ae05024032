"""The Marathon (Mesos) watcher: follows Marathon's apps and event stream and hands the proxy
whole snapshots, marathon-lb's labels kept, without reloads.

watcher.py (the Source: debounced sync, silent-stream reconnect, isolation), client.py (HTTP to
Marathon: failover, redirects, credentials), sse.py (a bounded event-stream parser),
translate.py (a pure function from the apps JSON to a Translation), labels.py (marathon-lb's
label values read one by one), apps.py (ports, networking modes and task addresses).
"""
