"""edgelb: an edge reverse-proxy load balancer whose pools hot-swap without reloads."""

__version__ = "0.1.0"
