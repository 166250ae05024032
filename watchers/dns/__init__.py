"""The DNS source: backends from SRV and A/AAAA records (a service's `dns:`).

settings.py (the `resolvers:` block, /etc/resolv.conf), resolver.py (one lookup, over UDP with
a TCP retry on truncation: a `Answer`, `NoRecords` or `Failure`), records.py (a pure function
from an answer to backends), source.py (the source between the file watcher and the runtime:
it fills the DNS-backed services' backends and re-applies the file's snapshot when an answer
changes)."""
