"""Baton's five services. Each imports ``shared`` and never another service."""
