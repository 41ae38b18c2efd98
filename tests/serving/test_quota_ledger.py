"""A router replica's client of the shared quota ledger when the ledger does not answer: failing
open admits by the replica's own count, failing closed refuses with UNAVAILABLE and a retry hint;
both are counted. (The ledger itself: tests/tenancy/test_ledger.py; shared by two router replicas:
tests/tenancy/test_served.py.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from speccascade.config.app import TenancyConfig
from speccascade.serving.quota_ledger import SharedQuotas
from speccascade.tenancy import QuotaExceeded, Tenant
from speccascade.tenancy.ledger import QuotaLedger
from speccascade.tenancy.quota import QuotaUnavailable


class Counted:
    def __init__(self):
        self.tags: list[dict] = []

    def inc(self, tags=None):
        self.tags.append(tags)


def quotas_without_ledger(mode: str) -> tuple[SharedQuotas, Counted]:
    unreachable = Counted()
    quotas = SharedQuotas("app", TenancyConfig(quota_ledger_unreachable=mode, quota_ledger_timeout_s=0.1),
                          SimpleNamespace(quota_ledger_unreachable=unreachable))

    # A ledger that never answers (its calls are awaitables that do not finish in time).
    quotas._handle = lambda: SimpleNamespace(admit=SimpleNamespace(remote=lambda *args: asyncio.sleep(3600)))
    return quotas, unreachable


SINGLE = Tenant(id="single", key_sha256=["0" * 64], limits={"max_concurrent_requests": 1})


def test_failing_open_admits_by_the_replicas_own_count():
    quotas, unreachable = quotas_without_ledger("open")

    async def scenario():
        first = await quotas.admit(SINGLE)
        with pytest.raises(QuotaExceeded, match="max_concurrent_requests=1"):  # the local limit still holds
            await quotas.admit(SINGLE)
        assert quotas.active() == {"single": 1}
        first.release()
        assert quotas.active() == {}

    asyncio.run(scenario())
    assert unreachable.tags == [{"mode": "open"}] * 2


def test_failing_closed_refuses_with_unavailable_and_a_retry_hint():
    quotas, unreachable = quotas_without_ledger("closed")
    with pytest.raises(QuotaUnavailable) as error:
        asyncio.run(quotas.admit(SINGLE))
    assert error.value.status == "UNAVAILABLE" and error.value.retry_after_ms >= 1
    assert "quota ledger did not answer within 0.1s" in str(error.value) and "quota_ledger_unreachable=closed" in \
        str(error.value)
    assert unreachable.tags == [{"mode": "closed"}] and quotas.active() == {}


class SlowStartingLedger:
    """A ledger being made: nothing answers before `ready_after_s`, then every call does at once."""

    def __init__(self, ready_after_s: float):
        self.ready_after_s = ready_after_s
        self.started: float | None = None

    def __getattr__(self, method):
        if method == "release":  # fire and forget
            return SimpleNamespace(remote=lambda *args: None)

        async def call(*args):
            loop = asyncio.get_running_loop()
            self.started = self.started or loop.time()
            await asyncio.sleep(max(0.0, self.started + self.ready_after_s - loop.time()))
            return {} if method == "active" else SimpleNamespace(raise_if_refused=lambda: None)

        return SimpleNamespace(remote=call)


class LateLedger:
    """A real ledger behind a handle with Ray's semantics for one caller: calls delivered in order,
    each `delay_s` late, and run whether or not the caller still waits for the answer."""

    def __init__(self, delay_s: float):
        self.ledger = QuotaLedger()
        self.delay_s = delay_s
        self._last: asyncio.Future | None = None

    def __getattr__(self, method):
        def remote(*args):
            previous, delay_s = self._last, self.delay_s

            async def deliver():
                if previous is not None:
                    await asyncio.wait([previous])
                await asyncio.sleep(delay_s)
                return getattr(self.ledger, method)(*args)

            self._last = asyncio.ensure_future(deliver())
            return asyncio.shield(self._last)  # a caller that stops waiting does not stop the call

        return SimpleNamespace(remote=remote)


def test_an_admission_the_ledger_grants_after_the_wait_ended_is_given_back():
    """Failing closed, the request is refused when the ledger answers too late; the ledger still
    admits its ticket when the call arrives, and the release that follows it frees the tenant's
    one slot at once (not when the lease runs out)."""
    quotas, unreachable = quotas_without_ledger("closed")
    del quotas._handle  # the real one, over the handle set here
    quotas._ledger = late = LateLedger(delay_s=0.3)  # three request timeouts

    async def scenario():
        with pytest.raises(QuotaUnavailable):
            await quotas.admit(SINGLE)
        await asyncio.wait([late._last])  # the admission, then its release, reached the ledger
        assert late.ledger.active() == {}
        late.delay_s = 0.0
        (await quotas.admit(SINGLE)).release()  # the tenant's next request is admitted
        quotas.close()

    asyncio.run(scenario())
    assert unreachable.tags == [{"mode": "closed"}]


def test_a_starting_replica_waits_for_a_ledger_slower_to_make_than_the_request_timeout():
    quotas, unreachable = quotas_without_ledger("closed")
    ledger = SlowStartingLedger(ready_after_s=0.4)  # four request timeouts
    quotas._handle = lambda: ledger

    async def scenario():
        assert await quotas.connect(timeout_s=5.0)
        admission = await quotas.admit(SINGLE)  # the ledger answers now, within the request timeout
        assert quotas.active() == {"single": 1}
        admission.release()
        quotas.close()

    asyncio.run(scenario())
    assert unreachable.tags == []


def test_a_replica_whose_ledger_never_answers_starts_and_follows_the_unreachable_rule(caplog):
    quotas, unreachable = quotas_without_ledger("closed")
    quotas._handle = lambda: SlowStartingLedger(ready_after_s=3600)
    assert not asyncio.run(quotas.connect(timeout_s=0.2))
    assert "did not answer within 0.2s of this router replica's start" in caplog.text
    with pytest.raises(QuotaUnavailable):
        asyncio.run(quotas.admit(SINGLE))


def test_a_slow_answer_keeps_the_handle_and_a_dead_ledger_is_made_again_once(monkeypatch):
    import ray
    from ray.exceptions import RayActorError

    quotas, _ = quotas_without_ledger("closed")
    del quotas._handle  # the real one, over the handle set here
    slow = SlowStartingLedger(ready_after_s=3600)
    quotas._ledger = slow
    with pytest.raises(QuotaUnavailable):
        asyncio.run(quotas.admit(SINGLE))
    assert quotas._ledger is slow  # a handle dropped here would let Ray collect a live ledger

    async def dead(*args):
        raise RayActorError()

    remade, made = SlowStartingLedger(ready_after_s=0.0), []
    monkeypatch.setattr(ray, "remote", lambda cls: SimpleNamespace(
        options=lambda **options: SimpleNamespace(remote=lambda: made.append(options) or remade)))
    quotas._ledger = SimpleNamespace(admit=SimpleNamespace(remote=dead))

    async def scenario():
        (await quotas.admit(SINGLE)).release()
        quotas.close()

    asyncio.run(scenario())
    assert quotas._ledger is remade and [options["name"] for options in made] == ["quota-ledger/app"]
    assert made[0]["get_if_exists"]  # another replica's new ledger is found, not doubled
