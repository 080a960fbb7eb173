"""Prefill worker: computes prompts pulled from the JetStream prefill queue."""
