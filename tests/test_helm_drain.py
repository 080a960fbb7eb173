"""Helm: each service's drain (BATON_DRAIN_TIMEOUT) fits in its pod's termination grace period,
so Kubernetes never SIGKILLs a service that is still finishing its requests. Rendered by Helm
itself (the helpers of tests/test_deploy.py); skipped locally without helm-python-sdk, failed in CI."""

from __future__ import annotations

import pytest

from tests.test_deploy import BATON_SERVICES, component, container, env_of, one, render

MARGIN_S = 5  # what a service needs after its drain to close its connections and exit


@pytest.mark.parametrize("values", [None, {"frontend": {"terminationGracePeriodSeconds": 300},
                                            "decode": {"terminationGracePeriodSeconds": 200}}],
                         ids=["defaults", "longer-grace"])
def test_every_service_drains_within_its_grace_period(values) -> None:
    docs = render(values)
    drains = {}
    for svc in BATON_SERVICES:
        dep = one(docs, "Deployment", component(svc))
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        env = [e for e in container(dep)["env"] if e["name"] == "BATON_DRAIN_TIMEOUT"]
        assert len(env) == 1, f"{svc}: BATON_DRAIN_TIMEOUT set {len(env)} times"
        drains[svc] = float(env[0]["value"])
        assert 0 < drains[svc] and drains[svc] + MARGIN_S <= grace, f"{svc}: drain {drains[svc]} s, grace {grace} s"
    # A stream through a draining frontend may last as long as the generation on a draining decode.
    assert drains["frontend"] >= drains["decode"]


def test_an_explicit_drain_timeout_is_kept() -> None:
    docs = render({"decode": {"env": {"BATON_DRAIN_TIMEOUT": "42"}}})
    env = env_of(container(one(docs, "Deployment", component("decode"))))
    assert env["BATON_DRAIN_TIMEOUT"]["value"] == "42"
    assert [e["name"] for e in container(one(docs, "Deployment", component("decode")))["env"]].count(
        "BATON_DRAIN_TIMEOUT") == 1
