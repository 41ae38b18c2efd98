"""A router replica's clock-driven work: started with the replica, stopped at its shutdown."""

from __future__ import annotations

import asyncio

import yaml
from speccascade.config import AppConfig
from speccascade.serving.router import RouterCore
from speccascade.tenancy import key_digest, new_api_key

from ..served import UncalledTierHandle, app_args


def tier_handle(name: str):
    """What the core reads of a tier's handle without calling it."""
    return UncalledTierHandle(name)


def test_the_tenants_file_is_reloaded_on_a_clock_and_the_task_ends_with_the_replica(tiny_pair, tmp_path):
    key = new_api_key()
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": []}))
    config = AppConfig.model_validate(app_args(*tiny_pair, tenancy={"tenants_file": str(path),
                                                                    "reload_period_s": 0.05}))

    async def scenario():
        core = RouterCore(tier_handle("Drafter"), tier_handle("Expert"), config)
        core.start()
        reloader = core._tenant_reloader
        path.write_text(yaml.safe_dump({"tenants": [{"id": "late", "key_sha256": [key_digest(key)]}]}))
        for _ in range(100):  # no request: only the replica's clock can see the change
            if core.access.watcher.registry.tenants:
                break
            await asyncio.sleep(0.02)
        assert core.identify([("x-api-key", key)]).id == "late"
        core.close()
        await asyncio.sleep(0)
        return reloader

    reloader = asyncio.run(scenario())
    assert reloader.cancelled()  # nothing left running


def test_a_core_without_tenants_starts_no_reloads(tiny_pair):
    async def scenario():
        core = RouterCore(tier_handle("Drafter"), tier_handle("Expert"), AppConfig.model_validate(app_args(*tiny_pair)))
        core.start()
        started = core._tenant_reloader
        core.close()
        return started

    assert asyncio.run(scenario()) is None


def test_the_load_is_posted_from_the_replicas_start_not_its_first_request(tiny_pair, monkeypatch):
    """The status board's actor is a Ray worker process: made when the replica starts, its start-up
    does not share the cores with the first request's passes."""
    from types import SimpleNamespace

    from ray import serve
    from speccascade.serving import router
    from speccascade.status_board import PIPELINE, TENANT_LOAD

    posts = []

    class RecordingPoster:
        def __init__(self, app_name):
            self.app_name = app_name

        def post(self, topic, source, record):
            posts.append((self.app_name, topic, source, record))

    context = SimpleNamespace(app_name="app", replica_id=SimpleNamespace(unique_id="replica-1"))
    monkeypatch.setattr(router, "StatusPoster", RecordingPoster)

    async def scenario():
        core = RouterCore(tier_handle("Drafter"), tier_handle("Expert"), AppConfig.model_validate(app_args(*tiny_pair)))
        monkeypatch.setattr(serve, "get_replica_context", lambda: context)  # the core now runs as a replica
        core.start()
        publisher = core._load_publisher
        for _ in range(100):  # no request
            if len(posts) >= 2:
                break
            await asyncio.sleep(0.02)
        core.close()
        await asyncio.sleep(0)
        return publisher

    publisher = asyncio.run(scenario())
    assert [(app, topic, source) for app, topic, source, _ in posts[:2]] == [
        ("app", TENANT_LOAD, "replica-1"), ("app", PIPELINE, "replica-1")]
    assert posts[0][3]["active"] == {}  # nothing in flight yet
    assert publisher.cancelled()  # nothing left running
