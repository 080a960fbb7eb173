"""Helm: engine pods on one node share its CPUs; each runs as many matmul threads as it requested
(shared/engines/cpu_threads.py). Rendered by Helm itself (the helpers of tests/test_deploy.py)."""

from __future__ import annotations

import pytest

from tests.test_deploy import component, container, one, render


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_an_engines_threads_are_its_pods_cpu_request(role: str) -> None:
    """Engine pods on one node share its CPUs: each runs as many threads as it requested."""
    env = [e for e in container(one(render(), "Deployment", component(role)))["env"]
           if e["name"] == "BATON_TORCH_THREADS"]
    assert env == [{"name": "BATON_TORCH_THREADS", "valueFrom": {"resourceFieldRef": {
        "containerName": role, "resource": "requests.cpu", "divisor": "1"}}}]
    own = container(one(render({role: {"env": {"BATON_TORCH_THREADS": "6"}}}), "Deployment", component(role)))
    assert [e for e in own["env"] if e["name"] == "BATON_TORCH_THREADS"] == [
        {"name": "BATON_TORCH_THREADS", "value": "6"}]  # the operator's own, once
