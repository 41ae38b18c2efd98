"""The deployments drain on shutdown: Serve's graceful shutdown takes the router's
`drain_timeout_s`, and each tier's plus a margin for Serve's own wait, with the tier's drain as
Serve's shutdown hook."""

from __future__ import annotations

import asyncio
import inspect
from unittest import mock

import pytest
from speccascade.app import TIER_SHUTDOWN_MARGIN_S, build_app
from speccascade.config.app import AppConfig
from speccascade.serving.tiers import DrafterTier, ExpertTier


def router_deployment(args: dict):
    return build_app(args)._bound_deployment


def tier_deployments(args: dict):
    """The drafter's and the expert's deployments, as the router's arguments bind them."""
    drafter, expert, _config = router_deployment(args).init_args
    return drafter._bound_deployment, expert._bound_deployment


@pytest.mark.parametrize("drain", [0.0, 45.0])
def test_a_stopping_router_replica_gets_drain_timeout_s_for_its_streams(drain):
    config = router_deployment({"router": {"drain_timeout_s": drain}})._deployment_config
    assert config.graceful_shutdown_timeout_s == drain
    assert 0 < config.graceful_shutdown_wait_loop_s <= 1.0


def test_the_default_drain_and_bad_values():
    assert router_deployment({})._deployment_config.graceful_shutdown_timeout_s == AppConfig().router.drain_timeout_s
    with pytest.raises(ValueError, match="drain_timeout_s"):
        AppConfig.model_validate({"router": {"drain_timeout_s": -1}})
    assert AppConfig().drafter.drain_timeout_s == AppConfig().expert.drain_timeout_s == 30.0
    with pytest.raises(ValueError, match=r"expert\.drain_timeout_s"):
        AppConfig.model_validate({"expert": {"model": AppConfig().expert.model, "drain_timeout_s": -0.5}})


@pytest.mark.parametrize("drain", [0.0, 90.0])
def test_a_stopping_tier_replica_gets_its_drain_timeout_and_drains_in_serves_hook(drain):
    defaults = AppConfig()
    deployments = tier_deployments({"drafter": {"model": defaults.drafter.model, "drain_timeout_s": drain},
                                    "expert": {"model": defaults.expert.model, "drain_timeout_s": drain + 1}})
    for deployment, cls, timeout in zip(deployments, (DrafterTier, ExpertTier), (drain, drain + 1)):
        config = deployment._deployment_config
        assert config.graceful_shutdown_timeout_s == timeout + TIER_SHUTDOWN_MARGIN_S
        assert 0 < config.graceful_shutdown_wait_loop_s <= 1.0
        served = deployment.func_or_class
        assert issubclass(served, cls) and served.__name__ == cls.__name__
        assert not hasattr(cls, "__del__")  # only the class Serve runs has the hook
        tier = object.__new__(served)
        with mock.patch.object(cls, "drain", mock.AsyncMock(return_value=0)) as drained:
            assert tier.__del__() is None  # collected outside a loop: no coroutine nobody awaits
            drained.assert_not_called()

            async def serve_shutdown():  # Serve, on the replica's loop: awaits what the hook returns
                hooked = tier.__del__()
                assert inspect.isawaitable(hooked)
                await hooked

            asyncio.run(serve_shutdown())
        drained.assert_awaited_once_with()
