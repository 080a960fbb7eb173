"""Baton: distributed LLM inference serving over NATS JetStream.

This package holds the umbrella CLI (``baton up``, ``baton model``, one subcommand per service)
and the client. The services live in ``services``; their contracts in ``shared``.
"""

__version__ = "0.1.0"
