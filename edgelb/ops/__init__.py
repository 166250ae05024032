"""Operating edgelb: the process (app, cli), the config file, the admin endpoint and
metrics, the Kubernetes manifests and the demo.

See ARCHITECTURE.md."""
