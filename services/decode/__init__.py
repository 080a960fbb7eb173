"""Decode worker: runs an engine, streams tokens, registers in discovery."""
