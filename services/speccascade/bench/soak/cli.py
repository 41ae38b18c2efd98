"""`speccascade bench soak`: C concurrent clients for M minutes against the served cascade, mixed
methods and rules, greedy and sampled, a share of client cancels and of expiring deadlines, and
optionally replica kills on a schedule. It measures what a long run must not show: failed
requests, growing memory, caches left behind, outputs that change with what happened.

Every `--sample-every` seconds it records requests ok / failed / cancelled / deadline-expired,
latency percentiles, the resident memory of every tier replica's process and its cache sessions,
and prints a progress line. When the clients stop it waits `--settle-s` (10 s) and counts the
sessions left; then it replays a sample of the completed requests fault-free (no cancels,
deadlines or kills; the same seeds) and counts identical outputs. Writes `NAME.json` (every
sample, kill and request) and `NAME.png` (memory and sessions over time) under `--out`. Ctrl-C
(or SIGTERM) ends the load early and the settle and the replay still run; a second one (or the
first, once the load has run its course) skips them; what was measured is written either way.

Against a running service (`--target host:port`, and a Ray connection to its cluster through
`--ray-address`, for the replicas' statistics and kills; a service with tenants takes the key from
$SPECCASCADE_API_KEY), or one it starts itself like `speccascade serve` (the real pair by default:
run it under `flock /tmp/speccascade-real-model.lock`). Measures failures, leaks and identical
outputs, not speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .probe import ServiceProbe
from .runner import Soak

DEFAULT_OUT = Path("benchmarks/soak")


# ---- running it ----

def start_service(args: argparse.Namespace):
    from ...app.launcher import ServeOverrides, start_serve_config
    from ...commands.serve import tier_process_overrides

    return start_serve_config(args.config, ServeOverrides(drafter=args.drafter, expert=args.expert, dtype=args.dtype,
                                                          backend=args.backend, device=args.device,
                                                          router_replicas=args.router_replicas,
                                                          **tier_process_overrides(args)),
                              grpc_port=args.grpc_port, http_port=args.http_port)


def run(args: argparse.Namespace) -> int:
    import ray
    from rich.console import Console

    from ...commands.serve import ShutdownSignals, stop_gracefully_unless_signalled
    from .report import report_again, summarize, write_outputs

    if args.report:
        report_again(args.report)
        return 0
    if args.clients < 1 or args.minutes <= 0 or args.sample_every <= 0:
        raise ValueError(f"--clients={args.clients}, --minutes={args.minutes:g} and --sample-every="
                         f"{args.sample_every:g} must be positive")
    if not 0 <= args.cancel_share + args.deadline_share <= 1 or min(args.cancel_share, args.deadline_share) < 0:
        raise ValueError(f"--cancel-share={args.cancel_share:g} and --deadline-share={args.deadline_share:g} "
                         "must be shares in [0, 1] adding up to at most 1")
    console = Console(stderr=True, highlight=False)
    launched = None
    if args.target is None:
        with console.status("starting Ray and the speccascade application (loading both tiers)..."):
            launched = start_service(args)
        target, app = launched.endpoints.grpc_target, launched.endpoints.app_name
    else:
        target, app = args.target, args.application
        if not ray.is_initialized():
            ray.init(address=args.ray_address, log_to_driver=False)
    # Ctrl-C or SIGTERM: the load ends early and the soak's checks still run; a second one skips them.
    # Either way what was measured is written, before the service (started here) is stopped.
    signals = ShutdownSignals()
    soak = Soak(args, target, app, ServiceProbe(app), console, end_load=signals.first, skip_checks=signals.second)
    try:
        soak.run()
        try:
            reference = soak.reference()
        except Exception as error:  # what the load measured is written all the same
            console.print(f"[red]no fault-free replay: {error}[/]")
            reference = {"compared": 0, "error": f"{type(error).__name__}: {error}"}
        outcomes = soak.outcomes_so_far()
        summary = summarize(args, soak.samples, outcomes, soak.kills, reference, stopped_s=soak.stopped_s,
                            interrupted=soak.interrupted())
        write_outputs(args, soak.samples, outcomes, soak.kills, summary, stopped_s=soak.stopped_s)
    finally:
        signals.ask_to_stop()  # from here a signal stops the service at once
        if launched is not None:
            stop_gracefully_unless_signalled(launched.stack, signals)
        signals.restore()
    return 0


KILLABLE = ("Expert", "Drafter", "Router")


def kill_order(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in KILLABLE]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--kill-order takes deployments from {', '.join(KILLABLE)}, comma-separated; "
                                         f"got {text!r}")
    return names


def register(benches) -> None:
    from ...commands.serve import add_execution_arguments, add_tier_process_arguments, positive_int
    from ...config.app import DTYPE_NAMES

    parser = benches.add_parser("soak", help="concurrent clients for minutes, with cancels, deadlines and replica "
                                             "kills: failures, memory slope, sessions left, identical outputs",
                                description=__doc__.split("\n\n")[0])
    service = parser.add_argument_group("the service")
    service.add_argument("--target", help="host:port of a running service (default: start one here)")
    service.add_argument("--application", default="speccascade", help="Serve application name (with --target)")
    service.add_argument("--ray-address", default="auto", help="Ray cluster of the --target service (default auto)")
    service.add_argument("--config", type=Path, help="Serve config when starting here (default: deploy/local-cpu.yaml)")
    service.add_argument("--drafter", help="drafter model source when starting here (default: the packaged pair)")
    service.add_argument("--expert", help="expert model source when starting here")
    service.add_argument("--dtype", choices=DTYPE_NAMES, help="both tiers' dtype when starting here")
    service.add_argument("--router-replicas", type=positive_int, metavar="N",
                         help="router replicas when starting here (default: the config's); two or more for "
                              "--kill-order Router, so the broken streams have a router to resume on")
    add_execution_arguments(service, overrides_config=True)
    add_tier_process_arguments(service, when=" when starting here")
    service.add_argument("--grpc-port", type=int, default=9421)
    service.add_argument("--http-port", type=int, default=8421)
    load = parser.add_argument_group("the load")
    load.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    load.add_argument("--minutes", type=float, default=20.0, help="how long the clients run (default 20)")
    load.add_argument("--cancel-share", type=float, default=0.1,
                      help="share of streams the client cancels after 1-4 chunks (default 0.1)")
    load.add_argument("--deadline-share", type=float, default=0.05,
                      help="share of requests with a deadline of 0.2-1x the median latency so far (default 0.05)")
    load.add_argument("--deadline-s", type=float, default=2.0, help="deadline before 3 requests have completed")
    load.add_argument("--max-new-tokens", type=int, default=48)
    load.add_argument("--block-size", type=int, default=5)
    load.add_argument("--kill-every", type=float, default=None, metavar="SECONDS",
                      help="kill an Expert replica, then a Drafter replica, ... every SECONDS (ray.kill)")
    load.add_argument("--kill-order", type=kill_order, default=("Expert", "Drafter"), metavar="D1,D2,...",
                      help="the deployments whose replicas are killed, in turn (Expert, Drafter, Router; default "
                           "Expert,Drafter). Router: the streams it served break off and their clients resume them "
                           "on another router replica (run two: router.replicas); the summary counts the resumes")
    load.add_argument("--seed", type=int, default=0, help="seed of the request plan (and the kills)")
    measure = parser.add_argument_group("the measurement")
    measure.add_argument("--sample-every", type=float, default=30.0, help="seconds between samples (default 30)")
    measure.add_argument("--settle-s", type=float, default=10.0,
                         help="wait this long after the clients stop before counting sessions left (default 10)")
    measure.add_argument("--slope-skip-minutes", type=float, default=2.0,
                         help="leave the first minutes (warm-up) out of the memory slope (default 2)")
    measure.add_argument("--reference-limit", type=int, default=32,
                         help="completed requests replayed fault-free for the identical-output count (default 32)")
    measure.add_argument("--reference-repeats", type=int, default=1, choices=[1, 2],
                         help="2: replay twice and also count how often two fault-free runs agree (default 1)")
    measure.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    measure.add_argument("--name", default="soak", help="file names: NAME.json and NAME.png (default soak)")
    measure.add_argument("--report", type=Path, metavar="JSON",
                         help="no load: summarize a finished soak's JSON again, rewrite it and redraw its plot")
    parser.set_defaults(handler=run)
