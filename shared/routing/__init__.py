"""The router's core, shared by the router service and a frontend that embeds it (``--router embedded``).

- :mod:`shared.routing.policy`: round-robin / random and the :class:`RoutingPolicy` interface;
- :mod:`shared.routing.kv_policy`, :mod:`shared.routing.kv_index`: the KV-aware policies and their index;
- :mod:`shared.routing.kv_feed`: the index fed from the KV-events stream (snapshots, resyncs);
- :mod:`shared.routing.core`: :class:`RouterCore`, the decision and everything that keeps it current.
"""
