"""The tcp data path: static tcp ports relayed with splice(2), and TLS terminated or
passed through on them.

See ARCHITECTURE.md."""
