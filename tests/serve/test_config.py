"""AppConfig's own rules beyond single fields: the static backend's slots hold a whole batch, and
the replica bounds are the ones the autoscaling settings use."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from speccascade.autoscale.settings import TierScaling
from speccascade.config_base import ReplicaBounds
from speccascade.tiers.config import AppConfig, Replicas, TierConfig


def test_a_static_tier_needs_a_slot_for_every_session_of_a_batch():
    with pytest.raises(ValidationError, match="static.slots=16 is below max_batch_size=32"):
        TierConfig(model="m", backend="static", max_batch_size=32)
    tier = TierConfig(model="m", backend="static", max_batch_size=32, static={"slots": 32})
    assert tier.backend_options()["slots"] == 32
    # The hf backend has no slots: its static settings are not used, so not checked.
    assert TierConfig(model="m", backend="hf", max_batch_size=32).max_batch_size == 32


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
