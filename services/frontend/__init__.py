"""Frontend: OpenAI-compatible HTTP and the NATS request API."""
