"""Planner: watches queue depth and load to size the worker fleets."""
