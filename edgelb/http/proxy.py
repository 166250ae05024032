"""The HTTP/1.1 data path lives in the modules beside this one, one job each:

- exchange.py: one request and its response, and the states it goes through;
- client.py: ClientProtocol, one per client connection (parsing, local answers, pipelining);
- request.py: the checks of a request head and the head forwarded upstream;
- dispatch.py: route -> gates (sources, redirect, max_body, auth) -> pick -> queue -> retry;
- upstream.py: UpstreamProtocol, one per backend connection, kept alive; the response relayed;
- response_head.py: the response head rewritten for the client;
- accounting.py: durations, latency estimates, failures and slots given back.

Nothing is imported from here.
"""
