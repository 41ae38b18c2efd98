"""The Serve configs in deploy/ are valid Serve configs whose args validate into AppConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from speccascade.app import GRPC_SERVICER_FUNCTIONS, build_app
from speccascade.config.app import AppConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIGS = sorted(DEPLOY.glob("*.yaml"))


def test_both_configs_exist():
    assert {p.name for p in CONFIGS} >= {"local-cpu.yaml", "gpu-cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    (app,) = schema.applications
    assert app.import_path == "speccascade.app:build_app"
    config = AppConfig.model_validate(app.args)
    assert build_app(app.args) is not None
    assert config.router.placement.num_gpus == 0  # the router never holds a model


def test_gpu_config_pins_each_tier_to_its_node_group():
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "gpu-cluster.yaml").read_text())).applications
    config = AppConfig.model_validate(app.args)
    assert config.drafter.placement.ray_actor_options()["resources"] == {"drafter_tier": 1}
    assert config.expert.placement.ray_actor_options()["resources"] == {"expert_tier": 1}
    assert config.expert.placement.num_gpus >= 1


def test_a_bad_value_is_named():
    args = yaml.safe_load((DEPLOY / "local-cpu.yaml").read_text())["applications"][0]["args"]
    args["policy"]["alpha"] = 7.0
    with pytest.raises(ValueError, match="alpha=7.0"):
        build_app(args)
