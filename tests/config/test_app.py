"""AppConfig's own rules beyond single fields: the static backend's slots hold a whole batch and
bound the sequence length, the replica bounds are the ones the autoscaling settings use, and the
JSON Schema the Helm chart validates with agrees with the models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from speccascade.autoscale.settings import TierScaling
from speccascade.config.app import AppConfig, Replicas, TierConfig
from speccascade.config.base import ReplicaBounds


def test_a_static_tier_needs_a_slot_for_every_session_of_a_batch():
    with pytest.raises(ValidationError, match="static.slots=32 is below max_batch_size=64"):
        TierConfig(model="m", backend="static", max_batch_size=64)
    tier = TierConfig(model="m", backend="static", max_batch_size=64, static={"slots": 64})
    assert tier.backend_options()["slots"] == 64 and tier.backend_options()["max_batch"] == 64
    # The hf backend has no slots: its static settings are not used, so not checked.
    assert TierConfig(model="m", backend="hf", max_batch_size=64).max_batch_size == 64


def test_a_static_tier_needs_a_slot_for_every_session_a_router_decodes():
    """Fewer slots than the requests a router decodes at once: sessions would evict each other and
    recompute their contexts on every call."""
    static = {"model": "m", "backend": "static", "max_batch_size": 8, "static": {"slots": 16}}
    with pytest.raises(ValidationError, match="expert.static.slots=16 is below tenancy.max_decoding_requests=32"):
        AppConfig.model_validate({"expert": static})
    config = AppConfig.model_validate({"expert": static, "tenancy": {"max_decoding_requests": 16}})
    assert config.expert.static.slots == 16
    assert AppConfig.model_validate({"expert": {**static, "backend": "hf"}}).expert.backend == "hf"


def test_the_tiers_take_turns_only_on_one_shared_lock_file():
    def config(drafter_lock, expert_lock):
        return AppConfig.model_validate({"drafter": {"model": "d", "cpu_lock_file": drafter_lock},
                                         "expert": {"model": "e", "cpu_lock_file": expert_lock}})

    assert config("/tmp/cpu.lock", "/tmp/cpu.lock").tiers_take_turns
    assert not config(None, None).tiers_take_turns
    assert not config("/tmp/cpu.lock", None).tiers_take_turns  # the expert runs whenever it likes
    assert not config("/tmp/a.lock", "/tmp/b.lock").tiers_take_turns


def test_dtype_auto_is_the_default_and_resolves_by_the_machine(monkeypatch):
    import torch
    from speccascade.engine.backends import base

    assert TierConfig(model="m").dtype == "auto"
    monkeypatch.setattr(base, "cpu_bf16_flags", lambda: [])
    assert base.parse_dtype("auto", "cpu") is torch.float32  # bf16 would be emulated: ~3x slower
    monkeypatch.setattr(base, "cpu_bf16_flags", lambda: ["amx_bf16"])
    assert base.parse_dtype("auto", "cpu") is torch.bfloat16
    assert base.parse_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(ValueError, match="expected one of: auto, bf16, fp32"):
        base.parse_dtype("fp16")


@pytest.mark.parametrize("model", [Replicas, TierScaling])
def test_both_config_families_share_one_replica_bounds_rule(model):
    assert issubclass(model, ReplicaBounds)
    with pytest.raises(ValidationError, match="min_replicas=3 is above max_replicas=2"):
        model(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match=r"initial_replicas=5 is outside \[1, 4\]"):
        model(min_replicas=1, max_replicas=4, initial_replicas=5)
    with pytest.raises(ValidationError, match="max_replicas"):
        model(max_replicas=0)
    fields = model.model_json_schema()["properties"]
    assert (fields["min_replicas"]["minimum"], fields["max_replicas"]["minimum"]) == (0, 1)


def test_each_family_keeps_its_own_replica_defaults():
    assert (Replicas().min_replicas, Replicas().max_replicas) == (1, 1)
    assert (TierScaling().min_replicas, TierScaling().max_replicas) == (1, 4)


def test_unknown_keys_are_errors_everywhere():
    with pytest.raises(ValidationError, match="torch_thread"):
        AppConfig.model_validate({"drafter": {"model": "m", "torch_thread": 2}})
    with pytest.raises(ValidationError, match="max_replica\\b"):
        TierScaling.model_validate({"max_replica": 2})


def test_a_static_tier_bounds_the_sequence_like_its_backend():
    from speccascade.config.app import STATIC_DEFAULT_MAX_LEN

    assert TierConfig(model="m").sequence_limit(32768) == 32768
    assert TierConfig(model="m", backend="static").sequence_limit(32768) == STATIC_DEFAULT_MAX_LEN
    assert TierConfig(model="m", backend="static").sequence_limit(512) == 512
    assert TierConfig(model="m", backend="static", static={"max_len": 2048}).sequence_limit(32768) == 2048
    assert TierConfig(model="m", backend="static", static={"max_len": 8192}).sequence_limit(4096) == 4096


def test_the_static_backend_reports_the_same_window(tiny_model_dirs):
    """sequence_limit is what a static backend over the model says its context window is."""
    from speccascade.engine.backends import load_backend

    drafter_dir, _ = tiny_model_dirs
    for static in ({"max_len": 128}, {"max_len": None}):
        tier = TierConfig(model=drafter_dir, backend="static", dtype="fp32", device="cpu", static={"slots": 8, **static})
        backend = load_backend("static", drafter_dir, dtype="fp32", device="cpu", **tier.backend_options())
        model_window = backend.model.config.max_position_embeddings
        assert tier.sequence_limit(model_window) == backend.context_window


def schema_accepts(args: dict) -> bool:
    import jsonschema

    return jsonschema.Draft202012Validator(AppConfig.model_json_schema()).is_valid(args)


def model_accepts(args: dict) -> bool:
    try:
        AppConfig.model_validate(args)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("rule", [None, "lossless", "chow", "diff", "opt", "token", "token_v1", "token_v2", "lossy"])
def test_the_policy_schema_accepts_exactly_the_alphas_the_model_does(rule):
    for alpha in (-1.5, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 1.5):
        policy = {"alpha": alpha} if rule is None else {"rule": rule, "alpha": alpha}
        assert schema_accepts({"policy": policy}) == model_accepts({"policy": policy}), policy


@pytest.mark.parametrize(("resources", "valid"), [({"pool": 1}, True), ({"pool": 0.5}, True), ({"pool": 0}, False),
                                                  ({"pool": -1}, False), ({"": 1}, False)])
def test_the_resources_schema_accepts_exactly_what_the_model_does(resources, valid):
    args = {"drafter": {"model": "m", "placement": {"resources": resources}}}
    assert schema_accepts(args) == model_accepts(args) == valid


def test_a_tier_keeps_at_least_one_compiled_cpu_kernel():
    """torch's bf16 matmuls crash on an empty kernel cache; the bound is checked at config load."""
    assert AppConfig.model_validate({"drafter": {"model": "m", "cpu_kernel_cache": 1}}).drafter.cpu_kernel_cache == 1
    with pytest.raises(ValidationError, match=r"drafter\.cpu_kernel_cache\n.*greater than or equal to 1"):
        AppConfig.model_validate({"drafter": {"model": "m", "cpu_kernel_cache": 0}})
