"""The Grafana dashboard shipped with the chart: every query names metrics, and labels, that the
service really exports, derived from the code that creates them (the router's and tiers' metrics,
the autoscaling policy's gauges) the way Ray and Prometheus name them; and the chart ships it in a
ConfigMap that Grafana's sidecar picks up."""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import promql_parser
import pytest
from ray.serve import metrics as serve_metrics
from ray.util import metrics as ray_metrics
from speccascade.autoscale.policy import DecisionPublisher
from speccascade.k8s import select_kind
from speccascade.serving.metrics import RouterMetrics, TierMetrics

from .conftest import CHART_DIR, KUBERNETES_VERSION

DASHBOARD = CHART_DIR / "dashboards" / "speccascade.json"
SERVE_LABELS = {"deployment", "replica", "application"}  # added by ray.serve.metrics inside a replica
SCRAPE_LABELS = {"instance", "job", "SessionName"}  # added by Prometheus and by Ray's exporter
# Grafana's built-in interval variables, which are not PromQL; any duration stands in for them.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)")


def metric_objects(holder) -> list[ray_metrics.Metric]:
    found = []
    for value in vars(holder).values() if not isinstance(holder, dict) else holder.values():
        if isinstance(value, ray_metrics.Metric):
            found.append(value)
        elif isinstance(value, dict):
            found += metric_objects(value)
    return found


def exported_series() -> dict[str, set[str]]:
    """Prometheus series name -> its label names, for every metric the service creates: Ray
    prefixes `ray_`, counters get `_total`, histograms `_bucket` (with `le`), `_sum` and `_count`."""
    metrics = (metric_objects(RouterMetrics()) + metric_objects(TierMetrics("expert"))
               + metric_objects(DecisionPublisher()._make_gauges()))
    series: dict[str, set[str]] = {}
    for metric in metrics:
        labels = set(metric._tag_keys) | SCRAPE_LABELS
        if isinstance(metric, (serve_metrics.Counter, serve_metrics.Histogram, serve_metrics.Gauge)):
            labels |= SERVE_LABELS
        name = f"ray_{metric._name}"
        if isinstance(metric, ray_metrics.Counter):
            series[f"{name}_total"] = labels
        elif isinstance(metric, ray_metrics.Histogram):
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            series[name] = labels
    return series


SERIES = exported_series()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every templating query."""
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            selector, label = match.groups()
            found.append((f"variable {variable['name']}", f"count by ({label}) ({selector})"))
    return found


def selectors(expr) -> list:
    found = []
    promql_parser.walk(expr, lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None)
    return found


def problems_of(where: str, promql: str) -> list[str]:
    """What is wrong with one query against the exported series (empty: nothing)."""
    expr = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", promql))
    problems = []
    for selector in selectors(expr):
        if selector.name not in SERIES:
            problems.append(f"{where}: {selector.name} is not exported")
            continue
        unknown = {m.name for m in selector.matchers.matchers} - SERIES[selector.name]
        if unknown:
            problems.append(f"{where}: {selector.name} has no label {sorted(unknown)}")

    def check_node(node):
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            for selector in selectors(node.expr):
                missing = set(node.modifier.labels) - SERIES.get(selector.name, set(node.modifier.labels))
                if missing:
                    problems.append(f"{where}: groups {selector.name} by {sorted(missing)}, which it does not have")
        if isinstance(node, promql_parser.Call) and node.func.name in ("rate", "increase"):
            for selector in selectors(node):
                if not selector.name.endswith(("_total", "_bucket", "_sum", "_count")):
                    problems.append(f"{where}: {node.func.name}() of {selector.name}, which is not a counter")
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            for selector in selectors(node):
                if not selector.name.endswith("_bucket"):
                    problems.append(f"{where}: histogram_quantile over {selector.name}, not a _bucket series")

    promql_parser.walk(expr, check_node)
    return problems


# ------------------------------------------------------------------------------------- the queries

def test_the_exported_names_follow_the_round_records():
    # The counters are named after RoundRecord's fields (engine.stats.COUNTER_NAMES).
    from speccascade.engine.stats import COUNTER_NAMES

    for name in COUNTER_NAMES:
        assert SERIES[f"ray_speccascade_{name}_total"] >= {"method", "rule", "application"}
    assert "ray_speccascade_autoscale_reason" in SERIES and "ray_speccascade_request_seconds_bucket" in SERIES


def test_every_query_names_exported_metrics_and_labels():
    found = queries(dashboard())
    assert len(found) > 20
    problems = [p for where, promql in found for p in problems_of(where, promql)]
    assert problems == []


@pytest.mark.parametrize("mutation,problem", [
    (("ray_speccascade_deferred_total", "ray_speccascade_deferred_positions_total"), "is not exported"),
    (('sum by (tier) (rate(ray_speccascade_tier_batch_size_sum', 'sum by (source) (rate(ray_speccascade_tier_batch_size_sum'),
     "does not have"),
    (("ray_speccascade_autoscale_replicas", "ray_speccascade_autoscale_replicas{rule=\"chow\"}"), "has no label"),
])
def test_the_check_catches_a_wrong_name_or_label(mutation, problem):
    old, new = mutation
    found = [(where, promql.replace(old, new)) for where, promql in queries(dashboard()) if old in promql]
    assert found, f"no query contains {old!r}"
    assert any(problem in p for where, promql in found for p in problems_of(where, promql))


def test_the_dashboard_covers_what_operators_watch_per_tenant_method_and_rule():
    board = dashboard()
    used = {s.name for _, promql in queries(board)
            for s in selectors(promql_parser.parse(GRAFANA_INTERVALS.sub("5m", promql)))}
    for name in ("output_tokens_total", "request_seconds_bucket", "first_token_seconds_bucket", "deferred_total",
                 "drafted_total", "accepted_total", "rounds_total", "skipped_blocks_total", "autoscale_replicas",
                 "autoscale_reason", "rejections_total", "tier_cached_sessions", "tier_sessions_ended_total",
                 "tier_late_calls_total"):
        assert f"ray_speccascade_{name}" in used, name
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "application", "tenant", "method", "rule"} <= variables
    by_method_and_rule = [p["title"] for p in board["panels"]
                          if any("by (method, rule)" in t["expr"] for t in p.get("targets", []))]
    assert {"Deferral rate", "Acceptance length", "Expert-skipped blocks"} <= set(by_method_and_rule)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"] if p["type"] != "row")
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


# ------------------------------------------------------------------------------------ the ConfigMap

def test_the_dashboard_configmap_is_off_by_default(render):
    assert [c for c in select_kind(render(), "ConfigMap") if "dashboard" in c["metadata"]["name"]] == []


def test_the_dashboard_configmap_is_labelled_for_the_grafana_sidecar(render):
    objects = render(set_values=["grafana.dashboard.enabled=true", "grafana.dashboard.annotations.grafana_folder=LLM"])
    (configmap,) = select_kind(objects, "ConfigMap", "v1")
    kubernetes_validate.validate(configmap, KUBERNETES_VERSION, strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert configmap["metadata"]["namespace"] == "serving"
    (name,) = configmap["data"]
    assert name.endswith(".json") and json.loads(configmap["data"][name]) == dashboard()


def test_the_sidecar_label_and_namespace_can_follow_the_grafana_install(render):
    objects = render(set_values=["grafana.dashboard.enabled=true", "grafana.dashboard.label=dashboards",
                                 "grafana.dashboard.labelValue=speccascade", "grafana.dashboard.namespace=monitoring"])
    (configmap,) = select_kind(copy.deepcopy(objects), "ConfigMap", "v1")
    assert configmap["metadata"]["labels"]["dashboards"] == "speccascade"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["namespace"] == "monitoring"
