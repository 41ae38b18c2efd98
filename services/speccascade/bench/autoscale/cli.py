"""`speccascade bench autoscale`: the deferral-aware policy against Ray Serve's queue-length policy,
replayed through a day-like load and deferral-rate trace with per-call service times measured on
this machine (see `speccascade.bench.autoscale.simulate` for what is and is not modelled).

Each policy runs at several operating points (deferral: target_utilization; queue:
target_ongoing_requests), because the two knobs are not the same unit: comparing one default
against the other would compare tunings, not policies. The headline pairs each queue point with the
cheapest deferral point whose expert p95 queueing delay is no higher.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml

DEFAULT_OUT = Path("benchmarks/autoscale")
SERVICE_TIMES = "service_times.json"
POLICY_DIR = Path(__file__).resolve().parents[3] / "deploy" / "autoscaling"
DEFERRAL_UTILISATIONS = (0.5, 0.55, 0.6, 0.7, 0.8, 0.9)
QUEUE_TARGETS = (0.5, 0.6, 0.75, 1.0, 1.5, 2.0)
QUICK_HOURS = 1.0
SIM_QUEUE_FLOOR = 2.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "autoscale", help="deferral-aware vs queue-length autoscaling on a simulated day",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--measure", action="store_true",
                        help="measure per-call service times of the real pair first (takes the real-model lock)")
    parser.add_argument("--service-times", type=Path, default=DEFAULT_OUT / SERVICE_TIMES,
                        help=f"per-call service times JSON (default {DEFAULT_OUT / SERVICE_TIMES})")
    parser.add_argument("--trace", type=Path, default=None,
                        help="a recorded trace JSON (bin_s, request_rate, deferral); default: synthetic day")
    parser.add_argument("--record-trace", type=float, default=None, metavar="MINUTES",
                        help="first record a trace from the served real pair for MINUTES (takes the real-model "
                             "lock) into OUT/recorded_trace.json, then replay it")
    parser.add_argument("--stretch", type=float, default=6.0,
                        help="a recorded trace's bins last this many times longer in the simulation (default 6)")
    parser.add_argument("--hours", type=float, default=6.0, help="simulated length of the synthetic day (default 6)")
    parser.add_argument("--peak-request-rate", type=float, default=0.9, help="requests/s at the day's peak")
    parser.add_argument("--max-drafter", type=int, default=32, help="drafter max_replicas in the simulation")
    parser.add_argument("--max-expert", type=int, default=16, help="expert max_replicas in the simulation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_HOURS:g} simulated hour, defaults only")
    parser.set_defaults(handler=handle)


def policy_settings(kind: str, *, max_drafter: int, max_expert: int, knob: float | None = None):
    from ...autoscale.settings import settings_from_dict

    document = yaml.safe_load((POLICY_DIR / f"{kind}.yaml").read_text())
    document["drafter"]["max_replicas"] = max_drafter
    document["expert"]["max_replicas"] = max_expert
    if kind == "deferral":
        # The simulated replicas serve one call at a time (the shipped files assume batching tiers
        # that hold max_batch_size = 8 calls), so the burst floor counts 2 ongoing calls a replica.
        document["drafter"]["queue_floor_ongoing_per_replica"] = SIM_QUEUE_FLOOR
        document["expert"]["queue_floor_ongoing_per_replica"] = SIM_QUEUE_FLOOR
    if knob is not None:
        key = "target_utilization" if kind == "deferral" else "target_ongoing_requests"
        document["drafter"][key] = document["expert"][key] = knob
    return settings_from_dict(document, source=f"{kind}.yaml")


def load_trace(path: Path, *, peak_request_rate: float, stretch: float):
    """A recorded trace, its bins stretched in time and its request rate scaled so that the busiest
    minute (3-bin average, to not chase one noisy bin) matches `peak_request_rate`; the deferral
    rates are replayed as recorded."""
    from .simulate import Trace

    try:
        data = json.loads(path.read_text())
        rates = [float(x) for x in data["request_rate"]]
        deferral = [float(x) for x in data["deferral"]]
        bin_s = float(data["bin_s"]) * stretch
    except FileNotFoundError:
        raise ValueError(f"trace file {str(path)!r} does not exist") from None
    except KeyError as missing:
        raise ValueError(f"trace {str(path)!r} lacks key {missing}") from None
    smoothed = [sum(rates[max(0, i - 1): i + 2]) / len(rates[max(0, i - 1): i + 2]) for i in range(len(rates))]
    scale = peak_request_rate / max(smoothed) if max(smoothed, default=0) > 0 else 0.0
    return Trace(bin_s=bin_s, request_rate=[r * scale for r in smoothed], deferral=deferral,
                 name=data.get("name", path.stem))


def headline(results: list[dict]) -> list[dict]:
    """For each queue point: the cheapest deferral point with expert p95 no higher."""
    deferral = [r for r in results if r["policy"] == "deferral"]
    rows = []
    for q in (r for r in results if r["policy"] == "queue"):
        eligible = [d for d in deferral if d["expert_wait_p95_s"] <= q["expert_wait_p95_s"] + 1e-9]
        best = min(eligible, key=lambda d: d["expert_replica_s"], default=None)
        rows.append({
            "queue": q["label"], "queue_expert_replica_h": q["expert_replica_s"] / 3600,
            "queue_expert_p95_s": q["expert_wait_p95_s"],
            "deferral": best["label"] if best else None,
            "deferral_expert_replica_h": best["expert_replica_s"] / 3600 if best else None,
            "deferral_expert_p95_s": best["expert_wait_p95_s"] if best else None,
            "expert_saving": 1 - best["expert_replica_s"] / q["expert_replica_s"] if best else None,
        })
    return rows


def print_table(results: list[dict], rows: list[dict]) -> None:
    print(f"{'policy':<24} {'expert rep-h':>12} {'drafter rep-h':>13} {'expert p95':>11} {'expert p99':>11} "
          f"{'expert mean':>12} {'drafter p95':>12} {'round p95':>10}")
    for r in results:
        print(f"{r['label']:<24} {r['expert_replica_s'] / 3600:>12.1f} {r['drafter_replica_s'] / 3600:>13.1f} "
              f"{r['expert_wait_p95_s'] * 1000:>9.0f}ms {r['expert_wait_p99_s'] * 1000:>9.0f}ms "
              f"{r['expert_wait_mean_s'] * 1000:>10.0f}ms {r['drafter_wait_p95_s'] * 1000:>10.0f}ms "
              f"{r['round_wait_p95_s'] * 1000:>8.0f}ms")
    print("\nqueue point -> cheapest deferral point with expert p95 <= it")
    for row in rows:
        if row["deferral"] is None:
            print(f"  {row['queue']:<22} no deferral point reaches expert p95 {row['queue_expert_p95_s'] * 1000:.0f}ms")
            continue
        print(f"  {row['queue']:<22} {row['queue_expert_replica_h']:.1f} rep-h @ {row['queue_expert_p95_s'] * 1000:.0f}ms"
              f"  vs  {row['deferral']:<22} {row['deferral_expert_replica_h']:.1f} rep-h @ "
              f"{row['deferral_expert_p95_s'] * 1000:.0f}ms  ({row['expert_saving'] * 100:+.0f}% expert replica-s saved)")


def plot_day(trace, pair: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    any_tl = next(iter(pair.values()))["timeline"]
    hours = [t / 3600 for t in any_tl["t"]]
    ax = axes[0]
    ax.plot(hours, any_tl["request_rate"], color="black", label="requests/s")
    ax.set_ylabel("requests/s")
    twin = ax.twinx()
    twin.plot(hours, any_tl["deferral"], color="tab:red", label="deferral rate")
    twin.set_ylabel("deferral rate δ", color="tab:red")
    ax.set_title(f"{trace.name}: load and deferral rate")
    for ax, tier in ((axes[1], "expert"), (axes[2], "drafter")):
        for label, result in pair.items():
            tl = result["timeline"]
            ax.step([t / 3600 for t in tl["t"]], tl[tier], where="post", label=f"{label}")
        ax.set_ylabel(f"{tier} replicas")
        ax.legend(loc="upper left")
    axes[-1].set_xlabel("simulated hours")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, marker in (("deferral", "o"), ("queue", "s")):
        points = sorted((r for r in results if r["policy"] == policy), key=lambda r: float(r["knob"]))
        xs = [r["expert_replica_s"] / 3600 for r in points]
        ys = [r["expert_wait_p95_s"] * 1000 for r in points]
        ax.plot(xs, ys, marker=marker, label=policy)
        for r, x, y in zip(points, xs, ys):
            ax.annotate(r["knob"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("expert replica-hours")
    ax.set_ylabel("expert p95 queueing delay (ms)")
    ax.set_yscale("symlog", linthresh=1.0)  # some operating points never queue at the 95th percentile
    ax.set_title("Operating points (labels: utilisation / ongoing target)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def handle(args: argparse.Namespace) -> int:
    from .service_times import ServiceTimes, measure
    from .simulate import Simulation, synthetic_day

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    times_path = args.service_times
    if args.measure:
        times = measure()
        times.save(times_path)
        print(f"measured: drafter step {times.drafter_step_s * 1000:.0f} ms, draft call "
              f"{times.drafter_call_s * 1000:.0f} ms, expert verify {times.expert_verify_s * 1000:.0f} ms -> {times_path}")
    times = ServiceTimes.load(times_path)
    trace_path = args.trace
    if args.record_trace:
        from .record import record, save

        trace_path = out / "recorded_trace.json"
        save(record(minutes=args.record_trace), trace_path)
        print(f"recorded {trace_path}")
    hours = QUICK_HOURS if args.quick else args.hours
    if trace_path is not None:
        trace = load_trace(trace_path, peak_request_rate=args.peak_request_rate, stretch=args.stretch)
    else:
        trace = synthetic_day(duration_s=hours * 3600, peak_request_rate=args.peak_request_rate, seed=args.seed)
    points = [("deferral", None), ("queue", None)]
    if not args.quick:
        points += [("deferral", u) for u in DEFERRAL_UTILISATIONS] + [("queue", q) for q in QUEUE_TARGETS]
    results, defaults = [], {}
    seen = set()
    for kind, knob in points:
        settings = policy_settings(kind, max_drafter=args.max_drafter, max_expert=args.max_expert, knob=knob)
        tier = settings.expert
        value = tier.target_utilization if kind == "deferral" else tier.target_ongoing_requests
        if (kind, value) in seen:
            continue
        seen.add((kind, value))
        label = f"{kind} u={value:g}" if kind == "deferral" else f"queue ongoing={value:g}"
        start = time.perf_counter()
        result = Simulation(trace, settings, drafter_call_s=times.drafter_call_s, expert_call_s=times.expert_verify_s,
                            block_size=times.block_size, seed=args.seed, label=label).run()
        row = {k: v for k, v in asdict(result).items() if k != "timeline"}
        row["knob"] = f"{value:g}"
        row["sim_seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        if knob is None:
            defaults[label + " (default)"] = asdict(result)
        print(f"  simulated {label} in {row['sim_seconds']} s", flush=True)
    rows = headline(results)
    print()
    print_table(results, rows)
    stem = "quick" if args.quick else (trace_path.stem if trace_path is not None else "synthetic_day")
    summary = {
        "trace": {"name": trace.name, "hours": trace.duration_s / 3600, "bin_s": trace.bin_s,
                  "peak_request_rate": max(trace.request_rate)},
        "service_times": asdict(times), "results": results, "headline": rows,
    }
    (out / f"{stem}_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_day(trace, defaults, out / f"{stem}_replicas.png")
    if len({r["policy"] for r in results}) == 2 and len(results) > 2:
        plot_frontier(results, out / f"{stem}_frontier.png")
    print(f"\nwrote {out / f'{stem}_results.json'} and plots in {out}")
    return 0
