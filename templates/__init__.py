"""Templates shipped as `edgelb.templates`: the status page (status.html.j2) and the Kubernetes
manifests (manifests/), rendered with jinja2."""
