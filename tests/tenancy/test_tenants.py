"""Tenants: keys by digest only, constant-time authentication, policy checks naming the field."""

from __future__ import annotations

import pytest
from speccascade.engine.request import GenerationRequest
from speccascade.tenancy import (
    PermissionDenied,
    Tenant,
    TenantRegistry,
    TenantsFile,
    Unauthenticated,
    key_digest,
    new_api_key,
)


def tenant(tenant_id: str, *keys: str, **fields) -> Tenant:
    return Tenant(id=tenant_id, key_sha256=[key_digest(k) for k in keys], **fields)


def test_a_key_authenticates_its_tenant_and_only_digests_are_stored(tmp_path):
    key_a, key_b, rotated = new_api_key(), new_api_key(), new_api_key()
    assert key_a.startswith("sc-") and key_a != key_b
    tenants = TenantsFile(tenants=[tenant("a", key_a, rotated), tenant("b", key_b)])
    registry = TenantRegistry(tenants)
    assert registry.authenticate(key_a).id == "a" and registry.authenticate(rotated).id == "a"
    assert registry.authenticate(key_b).id == "b"
    path = tmp_path / "tenants.yaml"
    tenants.save(path)
    text = path.read_text()
    assert key_a not in text and key_digest(key_a) in text
    assert (path.stat().st_mode & 0o777) == 0o600
    assert TenantsFile.load(path) == tenants


@pytest.mark.parametrize("key,message", [(None, "missing API key"), ("", "missing API key"),
                                         ("sc-not-a-key", "unknown API key")])
def test_missing_or_unknown_keys_are_unauthenticated(key, message):
    registry = TenantRegistry(TenantsFile(tenants=[tenant("a", new_api_key())]))
    with pytest.raises(Unauthenticated, match=message):
        registry.authenticate(key)


def test_a_disabled_tenant_is_refused():
    key = new_api_key()
    registry = TenantRegistry(TenantsFile(tenants=[tenant("a", key, disabled=True)]))
    with pytest.raises(PermissionDenied, match="tenant 'a' is disabled"):
        registry.authenticate(key)


@pytest.mark.parametrize("request_fields,fragment", [
    (dict(rule="token", alpha=0.3), "policy.rule='token' is not allowed for tenant 'held' (allowed: lossless)"),
    (dict(method="drafter"), "policy.method='drafter' is not allowed"),
    (dict(rule="lossless", max_new_tokens=300), "max_new_tokens=300 is above tenant 'held''s limit of 200"),
])
def test_requests_outside_the_allowance_are_denied_naming_the_field(request_fields, fragment):
    held = tenant("held", new_api_key(), limits={"max_new_tokens": 200},
                  policy={"rules": ["lossless"], "methods": ["cascade", "expert"]})
    with pytest.raises(PermissionDenied, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        held.check(GenerationRequest(prompt="x", **request_fields))
    held.check(GenerationRequest(prompt="x", rule="lossless", max_new_tokens=200))  # inside: allowed
    held.check(GenerationRequest(prompt="x", method="expert", max_new_tokens=100))


def test_alpha_range_applies_to_rules_that_use_alpha():
    capped = tenant("capped", new_api_key(), policy={"alpha": {"min": 0.0, "max": 0.3}})
    with pytest.raises(PermissionDenied, match=r"policy.alpha=0.5 is outside the alpha \[0, 0.3\]"):
        capped.check(GenerationRequest(prompt="x", rule="token", alpha=0.5))
    with pytest.raises(PermissionDenied, match="policy.alpha=0.9"):
        capped.check(GenerationRequest(prompt="x", method="token-cascade", alpha=0.9))
    capped.check(GenerationRequest(prompt="x", rule="lossless", alpha=0.9))  # lossless ignores alpha
    capped.check(GenerationRequest(prompt="x", rule="chow", alpha=0.3))


@pytest.mark.parametrize("raw,fragment", [
    ({"tenants": [{"id": "a", "key_sha256": ["0" * 64]}, {"id": "a", "key_sha256": ["1" * 64]}]}, "appears twice"),
    ({"tenants": [{"id": "a", "key_sha256": ["0" * 64]}, {"id": "b", "key_sha256": ["0" * 64]}]},
     "belongs to both 'a' and 'b'"),
    ({"tenants": [{"id": "a", "key_sha256": ["sc-plaintext-key"]}]}, "never the key itself"),
    ({"tenants": [{"id": "A B", "key_sha256": ["0" * 64]}]}, "tenants.0.id"),
    ({"tenants": [{"id": "a", "key_sha256": ["0" * 64], "weight": 0}]}, "tenants.0.weight"),
    ({"tenants": [{"id": "a", "key_sha256": ["0" * 64], "policy": {"rules": ["lossless"],
                                                                  "default_rule": "token"}}]},
     "default_rule='token' is not among the allowed rules"),
    ({"tenants": [{"id": "a", "key_sha256": ["0" * 64], "colour": "red"}]}, "tenants.0.colour"),
])
def test_a_bad_tenants_file_names_the_file_and_the_field(tmp_path, raw, fragment):
    import yaml

    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=f"tenants file '{path}' is invalid") as error:
        TenantsFile.load(path)
    assert fragment in str(error.value)


def test_replace_adds_or_updates_in_place():
    first, second = tenant("a", new_api_key()), tenant("b", new_api_key())
    tenants = TenantsFile(tenants=[first, second])
    updated = tenants.replace(first.model_copy(update={"disabled": True}))
    assert [t.id for t in updated.tenants] == ["a", "b"] and updated.get("a").disabled
    assert [t.id for t in updated.replace(tenant("c", new_api_key())).tenants] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no tenant 'z'"):
        tenants.get("z")


# ------------------------------------------------------------------ rules bound the methods too

HELD_TO_LOSSLESS = {"rules": ["lossless"]}


@pytest.mark.parametrize("policy,method,alpha,allowed", [
    # Held to lossless: only output with the expert's distribution.
    (HELD_TO_LOSSLESS, "cascade", 0.0, True),
    (HELD_TO_LOSSLESS, "expert", 0.0, True),
    (HELD_TO_LOSSLESS, "drafter", 0.0, False),
    (HELD_TO_LOSSLESS, "token-cascade", 0.3, False),
    (HELD_TO_LOSSLESS, "sequence-cascade", 0.3, False),
    # Drafter-only output is chow's at alpha 1, the token-level cascade chow's at the request's alpha.
    ({"rules": ["chow"]}, "drafter", 0.0, True),
    ({"rules": ["chow"]}, "token-cascade", 0.3, True),
    ({"rules": ["chow"], "alpha": {"min": 0.0, "max": 0.5}}, "drafter", 0.0, False),
    ({"rules": ["chow"]}, "expert", 0.0, False),
    ({"rules": ["token"]}, "drafter", 0.0, False),
    ({"rules": ["token"]}, "token-cascade", 0.3, False),
    # Expert-only output is also diff's at -1 and lossy's at 0, where they always defer.
    ({"rules": ["diff"]}, "expert", 0.0, True),
    ({"rules": ["lossy"], "alpha": {"min": 0.0, "max": 0.5}}, "expert", 0.0, True),
    ({"rules": ["lossy"], "alpha": {"min": 0.2, "max": 0.5}}, "expert", 0.0, False),
    # The sequence-level cascade follows no rule: only a tenant held to none may use it.
    ({}, "sequence-cascade", 0.3, True),
    ({"rules": ["lossless", "chow", "diff", "opt", "token", "lossy"]}, "sequence-cascade", 0.3, False),
    ({"alpha": {"min": 0.0, "max": 0.5}}, "drafter", 0.0, False),
    ({"alpha": {"min": 0.0, "max": 0.5}}, "expert", 0.0, True),
])
def test_a_tenants_rules_bound_the_methods_it_may_use(policy, method, alpha, allowed):
    held = tenant("held", new_api_key(), policy=policy)
    request = GenerationRequest(prompt="x", method=method, rule="lossless", alpha=alpha)
    if allowed:
        held.check(request)
    else:
        with pytest.raises(PermissionDenied, match=rf"^policy\.method='{method}' is not allowed for tenant 'held': "):
            held.check(request)


def test_a_method_refusal_says_what_its_output_is_and_what_the_tenant_may_use():
    auditor = tenant("auditor", new_api_key(), policy=HELD_TO_LOSSLESS)
    with pytest.raises(PermissionDenied) as error:
        auditor.check(GenerationRequest(prompt="x", method="drafter"))
    assert str(error.value) == ("policy.method='drafter' is not allowed for tenant 'auditor': its output is that of "
                                "chow at alpha=1, and the tenant is held to rules lossless (methods it may use: "
                                "cascade, expert)")
    with pytest.raises(PermissionDenied, match="'token-cascade' .*is that of chow at alpha=0.3, .*rules lossless"):
        auditor.check(GenerationRequest(prompt="x", method="token-cascade", alpha=0.3))
    with pytest.raises(PermissionDenied, match="'sequence-cascade' .*carries no rule's guarantee"):
        auditor.check(GenerationRequest(prompt="x", method="sequence-cascade", alpha=0.3))


def test_a_policy_listing_a_method_its_rules_never_allow_is_refused():
    from pydantic import ValidationError
    from speccascade.tenancy import TenantPolicy

    with pytest.raises(ValidationError, match=r"methods \['drafter'\] can never be used under rules lossless: "
                                              r"the output of 'drafter' is that of chow at alpha=1"):
        TenantPolicy(rules=["lossless"], methods=["cascade", "drafter"])
    with pytest.raises(ValidationError, match="the output of 'token-cascade' is that of chow at the request's alpha"):
        TenantPolicy(rules=["lossless"], methods=["token-cascade"])
    assert TenantPolicy(rules=["chow"], methods=["drafter", "token-cascade"]).usable_methods() == \
        ["drafter", "token-cascade"]


@pytest.mark.parametrize("policy,default", [
    ({"rules": ["lossless"]}, "lossless"),
    ({"rules": ["chow", "lossless"]}, "chow"),  # several: the first listed
    ({"rules": ["chow", "lossless"], "default_rule": "lossless"}, "lossless"),
    ({}, None),  # held to no rule: the server's
])
def test_the_default_rule_is_the_first_allowed_rule_unless_given(tmp_path, policy, default):
    import yaml

    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"id": "a", "key_sha256": ["0" * 64], "policy": policy}]}))
    derived = TenantsFile.load(path).get("a").policy.default_rule
    assert (derived.value if derived else None) == default
