"""HTTP/2 at both edges of the proxy, on hyper-h2's sans-I/O state machine.

An HTTP/2 stream is translated into one HTTP/1.1 exchange of the existing data path
(edgelb/http/), so routing, gates, caps, queueing, retries, outlier detection, picks and
metrics work per stream exactly as per request. `server.py` is the client side (one protocol
object per connection, a `stream.py` Stream per request), `upstream.py` the multiplexed
connections to backends that speak h2 or h2c, `translate.py` the pure functions between the
two framings, `grpc.py` what gRPC adds (status codes, deadlines), `limits.py` the bounds and
flood meters.
"""
