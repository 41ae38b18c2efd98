"""The router deployment drains on shutdown: Serve's graceful shutdown takes `router.drain_timeout_s`."""

from __future__ import annotations

import pytest
from speccascade.app import build_app
from speccascade.config.app import AppConfig


def router_deployment(args: dict):
    return build_app(args)._bound_deployment


@pytest.mark.parametrize("drain", [0.0, 45.0])
def test_a_stopping_router_replica_gets_drain_timeout_s_for_its_streams(drain):
    config = router_deployment({"router": {"drain_timeout_s": drain}})._deployment_config
    assert config.graceful_shutdown_timeout_s == drain
    assert 0 < config.graceful_shutdown_wait_loop_s <= 1.0


def test_the_default_drain_and_bad_values():
    assert router_deployment({})._deployment_config.graceful_shutdown_timeout_s == AppConfig().router.drain_timeout_s
    with pytest.raises(ValueError, match="drain_timeout_s"):
        AppConfig.model_validate({"router": {"drain_timeout_s": -1}})
