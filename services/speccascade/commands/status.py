"""`speccascade status`: each tier's running and target replicas, why the autoscaler chose them (the
inputs of its last decision), and the load per tenant, read from a running Ray cluster."""

from __future__ import annotations

import argparse
import json
import time

from ..autoscale.policy import ROLES
from ..engine.pipeline import MIN_HIT_RATE, QUEUE_PRESSURE
from ..status_board import AUTOSCALING, PIPELINE, TENANT_LOAD, read_posts

DEFAULT_APP = "speccascade"

DEMAND_LABELS = (  # (key in the decision record, label, format)
    ("tokens_per_s", "tokens/s T", "{:.1f}"),
    ("deferral_rate", "deferral rate δ", "{:.3f}"),
    ("block_size", "block size γ", "{:.2f}"),
    ("skippable_share", "chow share f", "{:.2f}"),
    ("accepted_length", "accepted length a", "{:.2f}"),
    ("expert_calls_per_round", "expert calls/round n", "{:.3f}"),
    ("tokens_per_round", "tokens/round τ", "{:.2f}"),
    ("rounds_per_s", "rounds/s R", "{:.2f}"),
    ("expert_calls_per_s", "expert calls/s E", "{:.2f}"),
    ("drafter_calls_per_s", "drafter calls/s D", "{:.2f}"),
)


def running_replicas(app_status) -> dict[str, int]:
    """Deployment name -> replicas in the RUNNING state, from `serve.status()`."""
    from ..serving.replicas import running_count

    out = {}
    for name, deployment in (app_status.deployments if app_status else {}).items():
        out[name] = running_count(deployment.replica_states)
    return out


def format_status(app: str, running: dict[str, int], record: dict | None, *, now: float) -> str:
    lines = [f"application {app!r}"]
    if record is None:
        lines.append("  no deferral-aware autoscaling decision recorded (policy `queue`, or not autoscaling yet)")
        for name, count in sorted(running.items()):
            lines.append(f"  {name:<10} running {count}")
        return "\n".join(lines)
    lines[0] += f": deferral-aware autoscaling, last decision {max(0.0, now - record['time']):.1f}s ago"
    header = f"  {'tier':<8} {'deployment':<12} {'running':>7} {'target':>6} {'desired':>8} {'floor':>5} " \
             f"{'ongoing':>8} {'s/call':>9} {'util':>5}  reason"
    lines.append(header)
    for role in ROLES:
        tier = record["tiers"].get(role)
        if tier is None:
            continue
        service = tier["service_time_s"]
        service_text = f"{service * 1000:.1f}ms" if service is not None else "-"
        utilisation = f"{tier['target_utilization']:.2f}" if role != "router" else "-"
        lines.append(
            f"  {role:<8} {tier['deployment']:<12} {running.get(tier['deployment'], tier['current_replicas']):>7} "
            f"{tier['target_replicas']:>6} {tier['desired_replicas']:>8.2f} {tier['queue_floor']:>5} "
            f"{tier['ongoing_requests']:>8.2f} {service_text:>9} {utilisation:>5}  {tier['reason']}"
        )
    demand = record.get("demand")
    if demand is None:
        lines.append("  demand: no router counters reported yet (targets held)")
    else:
        parts = [f"{label} " + (fmt.format(demand[key]) if demand.get(key) is not None else "-")
                 for key, label, fmt in DEMAND_LABELS]
        lines.append("  demand: " + " · ".join(parts))
        lines.append("  expert = E × s/call / util, drafter = D × s/call / util (see docs/autoscaling.md)")
    return "\n".join(lines)


TENANT_LOAD_STALE_S = 20.0  # a router replica posts at least every 5 s; older posts are replicas gone


def read_tenant_load(app: str) -> dict:
    """Requests in flight per tenant, summed over the router replicas that posted recently."""
    total: dict = {"active": {}, "waiting": 0, "decoding": 0, "replicas": 0}
    for post in read_posts(app, TENANT_LOAD, max_age_s=TENANT_LOAD_STALE_S).values():
        record = post.record
        total["replicas"] += 1
        total["waiting"] += record["waiting"]
        total["decoding"] += record["decoding"]
        for tenant, active in record["active"].items():
            total["active"][tenant] = total["active"].get(tenant, 0) + active
    return total


def format_tenant_load(load: dict) -> str:
    if not load["replicas"]:
        return "tenants: no router replica has served a request yet"
    active = ", ".join(f"{tenant or '(no tenants file)'} {count}" for tenant, count in
                       sorted(load["active"].items(), key=lambda item: -item[1])) or "none"
    return (f"tenants: requests in flight {active}; {load['decoding']} decoding, {load['waiting']} waiting for a "
            f"slot (over {load['replicas']} router replica{'s' if load['replicas'] != 1 else ''})")


def read_pipelining(app: str) -> dict:
    """Sessions by pipelining state and pre-drafts made and used, summed over the router replicas
    that posted recently."""
    total: dict = {"sessions": {}, "predrafts": 0, "predrafts_used": 0, "replicas": 0}
    for post in read_posts(app, PIPELINE, max_age_s=TENANT_LOAD_STALE_S).values():
        total["replicas"] += 1
        total["predrafts"] += post.record["predrafts"]
        total["predrafts_used"] += post.record["predrafts_used"]
        for state, count in post.record["sessions"].items():
            total["sessions"][state] = total["sessions"].get(state, 0) + count
    return total


def format_pipelining(pipelining: dict) -> str:
    """What pipelining does, and for `auto` why: sessions by state, and the hit rate so far."""
    if not pipelining["replicas"]:
        return "pipelining: no router replica has served a request yet"
    states = ", ".join(f"{count} {state}" for state, count in sorted(pipelining["sessions"].items())) or "no sessions"
    made, used = pipelining["predrafts"], pipelining["predrafts_used"]
    rate = f"{used}/{made} pre-drafts used ({used / made:.0%})" if made else "no pre-drafts yet"
    return (f"pipelining: {states}; {rate} (auto turns it off for a session below a {MIN_HIT_RATE:.0%} hit rate, "
            f"and while the drafter tier's calls queue more than {QUEUE_PRESSURE:.0%} of their compute)")


def read_decision(app: str) -> dict | None:
    """The autoscaling policy's last decision record, if it made one."""
    post = read_posts(app, AUTOSCALING).get("policy")
    return post.record if post else None


def register(subparsers) -> None:
    parser = subparsers.add_parser("status", help="tier replicas and the autoscaler's last decision",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--app", default=DEFAULT_APP, help=f"Serve application name (default {DEFAULT_APP})")
    parser.add_argument("--json", action="store_true", help="print the decision record as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        status = serve.status()
        app_status = status.applications.get(args.app)
        if app_status is None:
            raise ValueError(f"no Serve application {args.app!r}; running: {sorted(status.applications) or 'none'}")
        running = running_replicas(app_status)
        record = read_decision(args.app)
        load = read_tenant_load(args.app)
        pipelining = read_pipelining(args.app)
    finally:
        if connected_here:
            ray.shutdown()
    if args.json:
        print(json.dumps({"application": args.app, "running": running, "decision": record, "tenants": load,
                          "pipelining": pipelining}, indent=2))
    else:
        print(format_status(args.app, running, record, now=time.time()))
        print(format_tenant_load(load))
        print(format_pipelining(pipelining))
    return 0
