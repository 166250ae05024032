"""The HTTP/1.1 data path: listeners, the client and upstream protocols, routing by host and
path, response heads rewritten from their raw bytes, and request paths normalised."""
