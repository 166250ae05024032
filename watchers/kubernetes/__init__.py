"""The Kubernetes watcher: list+watch reflectors (reflector.py) keep caches of raw objects,
translate.py turns them into Snapshots, client.py finds the credentials to reach the API."""
