"""The gatekeeper: a tenant's defaults over the server's, and the tenants file looked at on a
clock, with no request needed."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from speccascade.config.app import CascadePolicy, TenancyConfig
from speccascade.serving.requests import request_with_policy
from speccascade.tenancy import PermissionDenied, Unauthenticated, key_digest, new_api_key
from speccascade.tenancy.gatekeeper import Gatekeeper

SERVER_POLICY = CascadePolicy(rule="token", alpha=0.5)


def gatekeeper_for(tmp_path, tenants: list[dict], **tenancy) -> Gatekeeper:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return Gatekeeper(TenancyConfig(tenants_file=str(path), **tenancy), SERVER_POLICY)


@pytest.mark.parametrize("policy,rule,alpha", [
    ({"rules": ["lossless"]}, "lossless", 0.5),  # the README's auditor: no --default-rule
    ({"rules": ["chow", "lossless"]}, "chow", 0.5),
    ({"rules": ["diff"]}, "diff", 0.5),
    ({"alpha": {"min": 0.0, "max": 0.3}}, "token", 0.0),  # the server's alpha is outside its range
    ({"rules": ["chow"], "alpha": {"min": 0.1, "max": 0.3}}, "chow", 0.1),
    ({"rules": ["chow"], "default_alpha": 0.2}, "chow", 0.2),
])
def test_a_request_that_names_no_rule_or_alpha_gets_ones_its_tenant_may_use(tmp_path, policy, rule, alpha):
    key = new_api_key()
    gatekeeper = gatekeeper_for(tmp_path, [{"id": "a", "key_sha256": [key_digest(key)], "policy": policy}])
    caller = gatekeeper.identify([("authorization", f"Bearer {key}")])
    request = request_with_policy(gatekeeper.policy_for(caller), prompt="x")
    assert (request.rule.value, request.alpha) == (rule, alpha)
    gatekeeper.check(caller, request)  # not refused


def test_the_tenants_file_is_looked_at_on_a_clock_without_requests(tmp_path):
    kept, revoked = new_api_key(), new_api_key()
    tenants = [{"id": "kept", "key_sha256": [key_digest(kept)]}, {"id": "gone", "key_sha256": [key_digest(revoked)]}]
    gatekeeper = gatekeeper_for(tmp_path, tenants, reload_period_s=0.05)
    path = tmp_path / "tenants.yaml"
    seen: list[str] = []

    async def scenario():
        reloader = asyncio.create_task(gatekeeper.reload_forever(seen.append))
        assert gatekeeper.identify([("x-api-key", revoked)]).id == "gone"
        path.write_text(yaml.safe_dump({"tenants": tenants[:1]}))
        for _ in range(100):  # no request in between: only the clock can notice
            if seen:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(Unauthenticated, match="unknown API key"):
            gatekeeper.identify([("x-api-key", revoked)])
        path.write_text("tenants: [{id: broken, key_sha256: [not-hex]}]")
        for _ in range(100):
            if len(seen) > 1:
                break
            await asyncio.sleep(0.02)
        assert gatekeeper.identify([("x-api-key", kept)]).id == "kept"  # the last good tenants stay
        path.write_text(yaml.safe_dump({"tenants": [{**tenants[0], "disabled": True}]}))
        for _ in range(100):
            if len(seen) > 2:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(PermissionDenied, match="disabled"):
            gatekeeper.identify([("x-api-key", kept)])
        reloader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reloader
        return reloader

    reloader = asyncio.run(scenario())
    assert seen == ["ok", "error", "ok"] and reloader.cancelled()


def test_without_a_tenants_file_nothing_is_looked_at():
    gatekeeper = Gatekeeper(TenancyConfig(), SERVER_POLICY)
    assert asyncio.run(asyncio.wait_for(gatekeeper.reload_forever(), 1.0)) is None
    assert gatekeeper.reload() is None
