"""auto pipelining: on while a session's pre-drafts hit and the drafter tier has room, and only where
the drafter's passes can run while the expert's do."""

from speccascade.engine.blocks import CallReport
from speccascade.engine.pipeline import MIN_ATTEMPTS, REPROBE_ROUNDS, PipelineGovernor
from speccascade.options import Pipeline


def test_on_and_off_are_what_they_say():
    assert PipelineGovernor(Pipeline.ON).wants_predraft()
    assert not PipelineGovernor(Pipeline.OFF).wants_predraft()
    governor = PipelineGovernor(Pipeline.ON)
    for _ in range(20):
        governor.observe_predraft(False)
    assert governor.wants_predraft()  # "on" is on, whatever the hit rate


def test_auto_stops_for_a_low_hit_rate_and_tries_again_later():
    governor = PipelineGovernor(Pipeline.AUTO)
    assert governor.reason() == "auto: on"
    for _ in range(MIN_ATTEMPTS):
        governor.observe_predraft(False)
    assert not governor.wants_predraft() and governor.reason() == "auto: off, hit rate low"
    for _ in range(REPROBE_ROUNDS):
        governor.observe_round(predrafted=False)
    assert governor.wants_predraft()  # a fresh try
    for hit in (True, False, True, False):
        governor.observe_predraft(hit)
    assert governor.wants_predraft() and governor.hit_rate == 0.5


def test_auto_stops_while_the_drafter_tier_is_busy():
    governor = PipelineGovernor(Pipeline.AUTO)
    for _ in range(10):
        governor.observe_draft_call(CallReport(queued_s=0.2, forward_s=0.1, decide_s=0.0))
    assert governor.reason() == "auto: off, drafter tier busy"
    for _ in range(20):
        governor.observe_draft_call(CallReport(queued_s=0.0, forward_s=0.1, decide_s=0.0))
    assert governor.wants_predraft()


def test_auto_never_drafts_ahead_where_the_passes_cannot_overlap():
    """In-process, or tiers taking turns on shared cores: a pre-draft runs before or after the
    verify, never beside it, so even one that always hits saves nothing."""
    governor = PipelineGovernor(Pipeline.AUTO, overlaps=False)
    for _ in range(2 * MIN_ATTEMPTS):
        governor.observe_predraft(True)
        governor.observe_round(predrafted=False)
    assert not governor.wants_predraft() and governor.reason() == "auto: off, passes cannot overlap"
    assert PipelineGovernor(Pipeline.ON, overlaps=False).wants_predraft()  # asked for: on all the same
