"""The drafter and expert roles a router gives each request over the tiers."""

from __future__ import annotations

import pytest
from speccascade.config import AppConfig
from speccascade.serving.clients import Transport
from speccascade.serving.router import RouterCore
from speccascade.tenancy.fairness import DEFAULT_SHARE

from ..served import UncalledTierHandle, app_args


@pytest.mark.parametrize("lock", [None, "/tmp/speccascade-test-cpu.lock"], ids=["tiers apart", "shared cores"])
def test_a_requests_drafter_overlaps_the_expert_unless_the_tiers_take_turns(tiny_pair, lock):
    """With both tiers locking one `cpu_lock_file`, a drafter pass never runs beside an expert pass:
    the request's drafter says so, and auto pipelining stays off for it (`PipelineGovernor`)."""
    config = AppConfig.model_validate(app_args(*tiny_pair, drafter={"cpu_lock_file": lock},
                                               expert={"cpu_lock_file": lock}))
    core = RouterCore(UncalledTierHandle("Drafter"), UncalledTierHandle("Expert"), config)
    drafter, expert = core.roles("-/session", Transport(), tag="lossless", share=DEFAULT_SHARE)
    assert drafter.computes_apart
    assert drafter.overlaps_expert is (lock is None)
    assert drafter.session_id == expert.session_id == "-/session"
