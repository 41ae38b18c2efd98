"""values.schema.json: generated from AppConfig (and the chart's own values), committed up to date,
and enforced by helm itself: a wrong value fails `helm lint` and `helm template` with a message
that names it."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from speccascade.k8s import HelmError

from .conftest import CHART_DIR, GPU_EXAMPLE, REPO_ROOT
from .test_chart import app_of, rayservice_of

SCHEMA_PATH = CHART_DIR / "values.schema.json"
AUTOSCALING_EXAMPLE = CHART_DIR / "examples" / "values-autoscaling.yaml"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_chart_schema", REPO_ROOT / "scripts" / "gen_chart_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def test_committed_schema_is_what_the_generator_writes():
    assert SCHEMA_PATH.read_text() == load_generator().generate(), "run python scripts/gen_chart_schema.py"


def test_check_mode_fails_on_a_stale_schema(tmp_path, monkeypatch, capsys):
    generator = load_generator()
    assert generator.main(["--check"]) == 0
    stale = tmp_path / "values.schema.json"
    stale.write_text(SCHEMA_PATH.read_text().replace('"minimum": 1', '"minimum": 2', 1))
    monkeypatch.setattr(generator, "SCHEMA_PATH", stale)
    monkeypatch.setattr(generator, "REPO", tmp_path)
    assert generator.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_the_app_block_is_app_config():
    from speccascade.config.app import AppConfig

    document = schema()
    assert document["properties"]["app"]["$ref"] == "#/$defs/AppConfig"
    expected = AppConfig.model_json_schema()
    defs = {**expected.pop("$defs"), "AppConfig": expected}
    assert {name: document["$defs"][name] for name in defs} == defs
    tier = document["$defs"]["TierConfig"]
    assert tier["additionalProperties"] is False
    assert tier["properties"]["max_batch_size"]["minimum"] == 1
    assert tier["properties"]["torch_threads"]["description"]


def test_the_deferral_policy_kwargs_are_autoscaling_settings():
    from speccascade.autoscale.settings import DEFERRAL_POLICY_FUNCTION, AutoscalingSettings

    document = schema()
    policy = document["properties"]["autoscaling"]["properties"]["autoscalingPolicy"]
    assert policy["if"]["properties"]["policy_function"]["const"] == DEFERRAL_POLICY_FUNCTION
    assert policy["then"]["properties"]["policy_kwargs"]["$ref"] == "#/$defs/AutoscalingSettings"
    expected = AutoscalingSettings.model_json_schema()
    defs = {**expected.pop("$defs"), "AutoscalingSettings": expected}
    assert {name: document["$defs"][name] for name in defs} == defs


def test_chart_values_are_documented_in_the_schema():
    """Every chart-only value carries the description of its `# --` comment in values.yaml."""
    undocumented = []

    def visit(node: dict, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if key in {"global", "app"}:
                continue
            if "properties" in sub:
                visit(sub, f"{path}{key}.")
            elif not sub.get("description"):
                undocumented.append(path + key)

    visit(schema(), "")
    assert undocumented == []


def model_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of a model's fields, nested models expanded."""
    paths = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= model_fields(annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def value_paths(values: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "resources":
            paths |= value_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def test_values_yaml_shows_every_app_config_field():
    """`helm show values` lists every setting; the schema holds each one's description and limits."""
    from speccascade.config.app import AppConfig

    app = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["app"]
    assert value_paths(app) == model_fields(AppConfig)


@pytest.mark.parametrize("values_file", [CHART_DIR / "values.yaml", GPU_EXAMPLE, AUTOSCALING_EXAMPLE],
                         ids=["default", "gpu-production", "autoscaling"])
def test_values_files_validate_against_the_schema_as_json_schema_2020_12(values_file):
    """Helm 3.17 validates with a draft-7 library; newer helm with a 2020-12 one: both must hold."""
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.Draft202012Validator(schema()).validate(yaml.safe_load(values_file.read_text()))


# ------------------------------------------------------------------------- helm refuses bad values

BAD_VALUES = [
    ({"app": {"drafter": {"max_batch_size": 0}}}, "app.drafter.max_batch_size: Must be greater than or equal to 1"),
    ({"app": {"drafter": {"torch_thread": 2}}}, "app.drafter: Additional property torch_thread is not allowed"),
    ({"app": {"expert": {"dtype": "fp16"}}}, 'app.expert.dtype must be one of the following: "auto", "bf16", "fp32"'),
    ({"app": {"expert": {"device": "gpu"}}}, "app.expert.device: Does not match pattern"),
    ({"app": {"expert": {"backend": "vllm"}}}, "app.expert.backend must be one of the following"),
    ({"app": {"drafter": {"torch_threads": 0}}}, "app.drafter.torch_threads: Must be greater than or equal to 1"),
    ({"app": {"drafter": {"static": {"slots": 0}}}}, "app.drafter.static.slots: Must be greater than or equal to 1"),
    ({"app": {"drafter": {"placement": {"resources": {"gpu_pool": 0}}}}},
     "app.drafter.placement.resources.gpu_pool: Must be greater than 0"),
    ({"app": {"router": {"replicas": {"max_replicas": 0}}}},
     "app.router.replicas.max_replicas: Must be greater than or equal to 1"),
    ({"app": {"policy": {"rule": "fast"}}}, "app.policy.rule must be one of the following"),
    ({"app": {"policy": {"rule": "lossy", "alpha": 1.0}}}, "app.policy.alpha: Must be less than 1"),
    ({"app": {"policy": {"rule": "chow", "alpha": -0.5}}}, "app.policy.alpha: Must be greater than or equal to 0"),
    ({"app": {"policy": {"max_new_tokens": 0}}}, "app.policy.max_new_tokens: Must be greater than or equal to 1"),
    # The layout before `app`: refused, not silently ignored.
    ({"policy": {"blockSize": 6}}, "(root): Additional property policy is not allowed"),
    ({"tiers": {"drafter": {"deployment": {"maxBatchSize": 32}}}},
     "tiers.drafter: Additional property deployment is not allowed"),
    ({"tiers": {"drafter": {"workerGroup": {"replicasPerPod": 0}}}},
     "tiers.drafter.workerGroup.replicasPerPod: Must be greater than or equal to 1"),
    ({"tiers": {"expert": {"rayResource": {"name": "expert tier"}}}},
     "tiers.expert.rayResource.name: Does not match pattern"),
    ({"service": {"type": "External"}}, "service.type must be one of the following"),
    ({"autoscaling": {"autoscalingPolicy": {"policy_function": "speccascade.autoscale.policy:DeferralAwarePolicy",
                                            "policy_kwargs": {"expert": {"max_replica": 4}}}}},
     "autoscaling.autoscalingPolicy.policy_kwargs.expert: Additional property max_replica is not allowed"),
]
BAD_IDS = ["batch-size-0", "unknown-field", "dtype-fp16", "device", "backend", "threads-0", "slots-0",
           "resource-0", "router-replicas-0", "rule", "lossy-alpha-1", "chow-alpha-negative", "max-new-tokens-0",
           "old-policy-block", "old-deployment-block", "replicas-per-pod-0", "resource-name-space", "service-type",
           "autoscaling-settings-unknown-key"]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=BAD_IDS)
def test_a_wrong_value_fails_helm_template_naming_it(render, tmp_path, overrides, message):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    with pytest.raises(HelmError, match="don't meet the specifications of the schema") as raised:
        render(values_files=(values,))
    assert message in str(raised.value)


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES[:3] + BAD_VALUES[10:11], ids=BAD_IDS[:3] + BAD_IDS[10:11])
def test_a_wrong_value_fails_helm_lint_naming_it(helm, tmp_path, overrides, message):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    result = subprocess.run([str(helm), "lint", "--strict", str(CHART_DIR), "--values", str(values)],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_helm_reads_a_fraction_given_with_set_as_a_string(render):
    """`--set app.policy.alpha=0.3` reaches the chart as the string "0.3": the schema says so
    instead of letting it through, and --set-json passes the number."""
    with pytest.raises(HelmError, match="app.policy.alpha: Invalid type. Expected: number, given: string"):
        render(set_values=["app.policy.alpha=0.3"])
    args = app_of(rayservice_of(render(set_json=["app.policy.alpha=0.3"])))["args"]
    assert args["policy"]["alpha"] == 0.3


def test_a_rule_with_its_own_alpha_range_renders(render, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"app": {"policy": {"rule": "diff", "alpha": -0.5}}}))
    assert app_of(rayservice_of(render(values_files=(values,))))["args"]["policy"] == {
        "rule": "diff", "alpha": -0.5, "block_size": 5, "max_new_tokens": 256, "max_new_tokens_cap": 2048,
        "pipeline": "auto"}
