"""Baton's contracts: messages, subjects, bus, discovery, config, telemetry, KV block hashing.

Every service imports from here and never from another service.
"""
