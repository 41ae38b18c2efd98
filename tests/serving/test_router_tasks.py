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
