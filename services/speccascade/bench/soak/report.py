"""What `speccascade bench soak` concludes from its samples: failures, memory slope, sessions left,
identical outputs; printed, as JSON, and as a plot of memory and sessions over time."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ...serving.heap import ProcessStats
from ..timing import percentile
from .probe import MEMORY_DEPLOYMENTS, TIERS, KillEvent, ReplicaSample, Sample
from .workload import Outcome

GIB = 1 << 30
SLOPE_WINDOW_S = 600.0  # the slope is reported per 10 minutes


def linear_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        raise ValueError("a slope needs points at two different times at least")
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def slope_pct_per_10min(points: list[tuple[float, float]]) -> float:
    mean = sum(y for _, y in points) / len(points)
    return 100 * linear_slope(points) * SLOPE_WINDOW_S / mean


def memory_slopes(samples: list[Sample], *, skip_s: float) -> dict[str, list[dict]]:
    """Per deployment (router and tiers), per replica seen in at least 3 load samples after its first `skip_s` (its warm-up;
    a replacement replica's counts from its own first sample): resident memory at the first and
    last of those samples and its least-squares slope in % of the mean per 10 minutes; also the
    slope over the second half of those samples (whether it still grows once warm) and over all
    of the replica's load samples, warm-up included."""
    out: dict[str, list[dict]] = {}
    for deployment in MEMORY_DEPLOYMENTS:
        series: dict[str, list[tuple[float, float]]] = {}
        for sample in samples:
            if sample.phase == "load":
                for replica in sample.memory(deployment):
                    series.setdefault(replica.replica_id, []).append((sample.t_s, replica.rss_bytes))
        rows = []
        for replica_id, every in series.items():
            points = [(t, y) for t, y in every if t >= every[0][0] + skip_s]
            if len(points) < 3:
                continue
            rows.append({
                "replica_id": replica_id, "samples": len(points), "from_min": points[0][0] / 60,
                "to_min": points[-1][0] / 60, "first_gib": points[0][1] / GIB, "last_gib": points[-1][1] / GIB,
                "slope_pct_per_10min": slope_pct_per_10min(points),
                "slope_second_half_pct_per_10min": (slope_pct_per_10min(points[len(points) // 2:])
                                                    if len(points) >= 6 else None),
                "slope_with_warmup_pct_per_10min": slope_pct_per_10min(every),
            })
        out[deployment] = rows
    return out


def summarize(args: argparse.Namespace, samples: list[Sample], outcomes: list[Outcome], kills: list[KillEvent],
              reference: dict, *, stopped_s: float, interrupted: dict | None = None) -> dict:
    """`interrupted`: the load ended early (Ctrl-C: `load_ended_at_min`), and whether the settle and
    the replay were skipped too (`checks_skipped`); None for a soak that ran its course."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "cancelled", "deadline")}
    ok = [o for o in outcomes if o.status == "ok"]
    latencies = [o.latency_s for o in ok]
    settled = next((s for s in reversed(samples) if s.phase == "settled"), None)
    return {
        "requests": len(outcomes), **counts,
        "failures": [{"index": o.index, "label": o.label, "code": o.code, "detail": o.detail, "at_min": o.started_s / 60}
                     for o in outcomes if o.status == "failed"],
        "planned_deadlines_completed_in_time": sum(o.action == "deadline" and o.status == "ok" for o in outcomes),
        "tokens_completed": sum(o.tokens for o in ok),
        "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
        "latency_p95_s": percentile(latencies, 0.95) if latencies else None,
        "requests_with_tier_retries": sum(o.tier_retries > 0 for o in outcomes),
        "requests_with_expert_only_fallback": sum(o.expert_only_fallback for o in outcomes),
        "requests_resumed": sum(o.resumes > 0 for o in outcomes),
        "resumes": sum(o.resumes for o in outcomes),
        "kills": [asdict(k) for k in kills],
        "memory": memory_slopes(samples, skip_s=args.slope_skip_minutes * 60),
        "clients_stopped_at_min": stopped_s / 60,
        "sessions_left": ({tier: settled.sessions(tier) for tier in TIERS} | {
            "router_active": settled.router_active_sessions, "after_s": args.settle_s} if settled else None),
        "late_calls_refused": ({tier: sum(r.late_calls for r in settled.tiers.get(tier, [])) for tier in TIERS}
                               if settled else None),
        "sessions_reclaimed_idle": ({tier: sum(r.reclaimed for r in settled.tiers.get(tier, [])) for tier in TIERS}
                                    if settled else None),
        "reference": reference,
        "interrupted": interrupted,
    }


def print_summary(summary: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(f"[bold]bench soak[/]: {args.clients} clients, {args.minutes:g} min, cancels "
                  f"{args.cancel_share:.0%}, deadlines {args.deadline_share:.0%}, "
                  + (f"a replica kill every {args.kill_every:g}s" if args.kill_every else "no kills"))
    interrupted = summary.get("interrupted")
    if interrupted:
        console.print(f"[yellow]stopped early: the load ended at {interrupted['load_ended_at_min']:.1f} of "
                      f"{args.minutes:g} min" + ("; the settle and the replay were cut short" if
                                                 interrupted["checks_skipped"] else "") + "[/]")
    failed_style = "green" if summary["failed"] == 0 else "red"
    console.print(f"requests {summary['requests']}: ok {summary['ok']}, [{failed_style}]failed {summary['failed']}[/], "
                  f"cancelled by the client {summary['cancelled']}, deadline expired {summary['deadline']} "
                  f"(+{summary['planned_deadlines_completed_in_time']} finished in time); "
                  f"latency p50 {fmt(summary['latency_p50_s'], 's')} p95 {fmt(summary['latency_p95_s'], 's')}; "
                  f"retried {summary['requests_with_tier_retries']}, expert-only fallback "
                  f"{summary['requests_with_expert_only_fallback']}, streams resumed "
                  f"{summary.get('requests_resumed', 0)} ({summary.get('resumes', 0)} resumes)")
    for failure in summary["failures"]:
        console.print(f"  [red]failed[/] #{failure['index']} {failure['label']} at {failure['at_min']:.1f} min: "
                      f"{failure['code']} {failure['detail']}")
    for kill in summary["kills"]:
        console.print(f"  killed {kill['deployment']} replica {kill['replica_id']} at {kill['t_s'] / 60:.1f} min")
    table = Table(title=f"resident memory per replica (after its first {args.slope_skip_minutes:g} min)")
    for column in ("deployment", "replica", "samples", "minutes", "first GiB", "last GiB", "slope %/10 min",
                   "second half", "with warm-up"):
        table.add_column(column, justify="right")
    for deployment, rows in summary["memory"].items():
        for row in rows:
            half = row["slope_second_half_pct_per_10min"]
            table.add_row(deployment, row["replica_id"], str(row["samples"]), f"{row['from_min']:.1f}-{row['to_min']:.1f}",
                          f"{row['first_gib']:.3f}", f"{row['last_gib']:.3f}", f"{row['slope_pct_per_10min']:+.2f}",
                          "-" if half is None else f"{half:+.2f}", f"{row['slope_with_warmup_pct_per_10min']:+.2f}")
    console.print(table)
    left = summary["sessions_left"]
    if left is not None:
        style = "green" if left["Drafter"] == 0 and left["Expert"] == 0 else "red"
        console.print(f"cache sessions left {left['after_s']:g}s after the clients stopped: [{style}]drafter "
                      f"{left['Drafter']}, expert {left['Expert']}[/] (router active: {left['router_active']}); "
                      f"late calls refused: {summary['late_calls_refused']}; idle sessions reclaimed: "
                      f"{summary['sessions_reclaimed_idle']}")
    reference = summary["reference"]
    if reference.get("error"):
        console.print(f"[red]no fault-free replay: {reference['error']}[/]")
    if reference.get("compared"):
        parts = [f"{k} {reference[k]['identical']}/{reference[k]['compared']}" for k in ("greedy", "sampled")
                 if reference[k]["compared"]]
        resumed = reference.get("resumed", {})
        if resumed.get("compared"):
            parts.append(f"of them resumed {resumed['identical']}/{resumed['compared']}")
        console.print(f"identical to a fault-free replay: {', '.join(parts)}")
        for diff in reference["differed"]:
            console.print(f"  #{diff['index']} {diff['label']}: first difference at token "
                          f"{diff['first_difference_at']} of {diff['tokens']} (retries {diff['tier_retries']}, "
                          f"fallback {diff['expert_only_fallback']}, resumes {diff.get('resumes', 0)})")
        for failed in reference["reference_failed"]:
            console.print(f"  [red]reference replay of #{failed['index']} failed: {failed['code']}[/]")
        floor = reference.get("replay_vs_replay")
        if floor and floor["compared"]:
            parts = [f"{k} {floor[k]['identical']}/{floor[k]['compared']}" for k in ("greedy", "sampled")
                     if floor[k]["compared"]]
            console.print(f"two fault-free replays identical to each other: {', '.join(parts)}")


def fmt(value: float | None, unit: str) -> str:
    return f"{value:.1f}{unit}" if value is not None else "-"


def plot(samples: list[Sample], kills: list[KillEvent], stopped_s: float, path: Path, title: str) -> None:
    """Resident memory of the router's and each tier's replicas (one panel each, so a slow creep
    shows), and cache sessions per tier with the router's active requests, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(MEMORY_DEPLOYMENTS) + 1
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3 * panels), sharex=True,
                             gridspec_kw={"height_ratios": [1] * (panels - 1) + [1.2]})
    colors = dict(zip(MEMORY_DEPLOYMENTS, ("tab:gray", "tab:cyan", "tab:purple")))
    for ax, deployment in zip(axes, MEMORY_DEPLOYMENTS):
        replicas: dict[str, list[tuple[float, float]]] = {}
        for sample in samples:
            for replica in sample.memory(deployment):
                replicas.setdefault(replica.replica_id, []).append((sample.t_s / 60, replica.rss_bytes / GIB))
        for i, (replica_id, points) in enumerate(replicas.items()):
            ax.plot(*zip(*points), marker=".", color=colors[deployment], alpha=1.0 if i == 0 else 0.55,
                    label=f"replica {replica_id}")
        ax.set_ylabel(f"{deployment.lower()} RSS (GiB)")
        if replicas:
            ax.legend(loc="lower right", fontsize=8)
    sessions = axes[-1]
    for tier in TIERS:
        counted = [(s.t_s / 60, s.sessions(tier)) for s in samples if s.sessions(tier) is not None]
        if counted:
            sessions.plot(*zip(*counted), marker=".", color=colors[tier], label=f"{tier.lower()} cache sessions")
    routed = [(s.t_s / 60, s.router_active_sessions) for s in samples if s.router_active_sessions is not None]
    if routed:
        sessions.plot(*zip(*routed), color="black", linestyle=":", label="router active requests")
    end = max(s.t_s for s in samples) / 60
    for ax in axes:
        for kill in kills:
            ax.axvline(kill.t_s / 60, color="tab:red", linestyle="--", linewidth=1)
        ax.axvspan(stopped_s / 60, end, color="0.9")
    for kill in kills:
        # Just inside the top panel, clear of its frame, on white so the curves under it do not cross it.
        axes[0].annotate(f"kill {kill.deployment.lower()}", (kill.t_s / 60, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(-3, -5), textcoords="offset points", rotation=90, va="top", ha="right",
                         fontsize=8, color="tab:red", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    axes[0].set_title(title)
    sessions.set_ylabel("sessions")
    sessions.set_xlabel("minutes (grey: the clients have stopped)")
    sessions.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_again(json_path: Path) -> dict:
    """Summarize a finished soak again from its JSON (the summary's figures as this version computes
    them), print it, rewrite the JSON and redraw the plot. Returns the summary."""

    data = json.loads(json_path.read_text())
    args = argparse.Namespace(**{**data["config"], "out": json_path.parent, "name": json_path.stem})
    samples = [Sample(**{**s, "tiers": {tier: [ReplicaSample(**r) for r in rs] for tier, rs in s["tiers"].items()},
                         "routers": [ProcessStats(**{"allocator": "not recorded", **r})  # the first such files had none
                                     for r in s.get("routers", [])]})
               for s in data["samples"]]
    outcomes = [Outcome(**r) for r in data["requests"]]
    kills = [KillEvent(**k) for k in data["summary"]["kills"]]
    stopped_s = data["summary"]["clients_stopped_at_min"] * 60
    summary = summarize(args, samples, outcomes, kills, data["summary"]["reference"], stopped_s=stopped_s,
                        interrupted=data["summary"].get("interrupted"))
    write_outputs(args, samples, outcomes, kills, summary, stopped_s=stopped_s)
    return summary


def plot_title(config: dict) -> str:
    return (f"bench soak: {config['clients']} clients, {config['minutes']:g} min, cancels "
            f"{config['cancel_share']:.0%}, deadlines {config['deadline_share']:.0%}"
            + (f", {config['dtype']}" if config.get("dtype") else "")
            + (f", {config['allocator']} allocator" if config.get("allocator") else "")
            + (f", CPU kernel cache {config['cpu_kernel_cache']}" if config.get("cpu_kernel_cache") is not None
               else "")
            + (f", OpenMP spin {config['cpu_spin_count']:,}" if config.get("cpu_spin_count") is not None else "")
            + (f", a replica kill every {config['kill_every']:g}s" if config.get("kill_every") else ""))


def write_outputs(args: argparse.Namespace, samples: list[Sample], outcomes: list[Outcome], kills: list[KillEvent],
                  summary: dict, *, stopped_s: float) -> tuple[Path, Path]:
    print_summary(summary, args)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("handler", "report")}
    json_path.write_text(json.dumps({
        "config": config, "summary": summary, "samples": [asdict(s) for s in samples],
        "requests": [{k: v for k, v in asdict(o).items() if k != "token_ids"} for o in outcomes],
    }, indent=1))
    plot(samples, kills, stopped_s, png_path, plot_title(config))
    print(f"wrote {json_path} and {png_path}")
    return json_path, png_path
