"""What edgelb tells about the traffic it carries besides metrics: access logs (`access.py`,
written by `sink.py`), request IDs (`request_id.py`), W3C trace context (`traceparent.py`) and
the proxy's spans exported over OTLP/HTTP (`otlp.py`, `exporter.py`). `hub.Telemetry` is the one
object the data path holds; None there means all of it is off and costs one attribute check."""
