"""The Gateway API source (gateway.networking.k8s.io/v1): resources, a pure translator and the
status the leader writes. Read by the Kubernetes watcher when `gateway_api` is on."""
