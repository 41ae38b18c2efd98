"""`bench serve`'s tables: served against in-process, where a round's time goes, throughput by
streams, the load, bytes on the wire; and the issue's targets, met or not."""

from __future__ import annotations

import statistics

from ..timing import percentile
from .measure import OTHER, PHASES, ROUND


def spread(values: list[float], digits: int = 2) -> str:
    """Median [min-max]."""
    ordered = sorted(values)
    return (f"{statistics.median(ordered):,.{digits}f} [{ordered[0]:,.{digits}f}-{ordered[-1]:,.{digits}f}]"
            if ordered else "-")


def print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]bench serve[/]: {report.pair}; {report.rule}(alpha={report.alpha:g}, "
                  f"gamma={report.block_size}), {report.max_new_tokens} new tokens, {report.dtype}")
    if report.tiers:
        console.print(f"tiers: {report.tiers}")
    if report.paired:
        table = Table(title="each request in-process, then served (interleaved): served / in-process")
        for column in ("request", "sampling", "per-token p50 ms (in / served)", "ratio", "TTFT ratio", "identical"):
            table.add_column(column, justify="right")
        for p in report.paired:
            table.add_row(p.task[:40], p.sampling,
                          f"{1e3 * percentile(p.in_process.token_gaps_s, 0.5):.1f} / "
                          f"{1e3 * percentile(p.served.token_gaps_s, 0.5):.1f}",
                          f"{p.token_ratio:.2f}", f"{p.ttft_ratio:.2f}", "yes" if p.identical else "NO")
        console.print(table)
        console.print(f"per-token latency served / in-process: median "
                      f"{spread([p.token_ratio for p in report.paired])} over {len(report.paired)} requests; TTFT "
                      f"{spread([p.ttft_ratio for p in report.paired])}; identical outputs "
                      f"{sum(p.identical for p in report.paired)}/{len(report.paired)}")
        labels = list(dict.fromkeys(p.sampling for p in report.paired))
        if len(labels) > 1:
            console.print("per-token served / in-process by sampling: " + "; ".join(
                f"{label} {spread([p.token_ratio for p in report.paired if p.sampling == label])}" for label in labels))
        console.print(f"page faults per round: in-process {spread([p.page_faults_per_round[0] for p in report.paired], 0)}"
                      f" (this process), served {spread([p.page_faults_per_round[1] for p in report.paired], 0)} "
                      f"(both tiers' processes)")
    splits = {name: b.per_round() for name, b in report.breakdowns.items() if b.rounds}
    splits.update({f"served, {c.streams} streams" + (f", {c.pipeline}" if c.pipeline != "off" else ""):
                   c.breakdown.per_round() for c in report.concurrency if c.breakdown.rounds})
    if splits:
        table = Table(title="where a round's time goes, ms per round (requests' own stats)")
        table.add_column("phase")
        for name in splits:
            table.add_column(name, justify="right")
        for phase in [*PHASES, OTHER]:
            table.add_row(phase, *(f"{split.get(phase, 0.0):.2f}" for split in splits.values()))
        table.add_row("[bold]round (wall time)[/]", *(f"{split.get(ROUND, 0.0):.2f}" for split in splits.values()))
        console.print(table)
        console.print("(a tier call counts whole in its phases, also where it ran beside the loop's work or another "
                      "call: the next draft, a pre-draft, the expert's early prefill; the rows may add up to more "
                      "than the round)")
    if report.pipelined:
        modes = list(report.pipelined[0].timings)
        table = Table(title="pipelining, each request in every mode (served): per-token p50 ms, pre-drafts used/made")
        for column in ("request", "sampling", *modes, "identical"):
            table.add_column(column, justify="right")
        for p in report.pipelined:
            table.add_row(p.task[:30], p.sampling, *(
                f"{1e3 * percentile(p.timings[m].token_gaps_s, 0.5):.1f} ({p.predrafts[m][1]}/{p.predrafts[m][0]})"
                for m in modes), "yes" if p.identical else "NO")
        console.print(table)
        for mode in modes:
            if mode == "off" or "off" not in modes:
                continue
            made = sum(p.predrafts[mode][0] for p in report.pipelined)
            used = sum(p.predrafts[mode][1] for p in report.pipelined)
            wasted = sum(p.predrafts[mode][2] for p in report.pipelined)
            console.print(f"pipelining {mode}: per-token latency off / {mode} "
                          f"{spread([p.speedup(mode) for p in report.pipelined])}; pre-drafts used {used}/{made}"
                          f" ({used / max(made, 1):.0%}), {wasted} drafter steps wasted; identical outputs "
                          f"{sum(p.identical for p in report.pipelined)}/{len(report.pipelined)}")
    if report.concurrency:
        per_stream = report.concurrency[0].requests_per_stream
        table = Table(title="aggregate throughput (served" + (f"; {per_stream} requests per stream, one after the other)"
                                                             if per_stream > 1 else ")"))
        for column in ("streams", "pipelining", "finished", "tokens", "wall s", "tokens/s", "x vs 1",
                       "per-token p50 ms", "pre-drafts used", "drafter batch", "expert batch"):
            table.add_column(column, justify="right")
        base = {c.pipeline: c.tokens_per_s for c in report.concurrency if c.streams == report.concurrency[0].streams}
        for c in report.concurrency:
            used = f"{c.predrafts[1]}/{c.predrafts[0]}" if c.predrafts[0] else "-"
            finished = f"{c.streams - len(c.failures)}/{c.streams}"
            table.add_row(str(c.streams), c.pipeline, finished if not c.failures else f"[red]{finished}[/]",
                          str(c.tokens), f"{c.wall_s:.1f}", f"{c.tokens_per_s:.1f}",
                          f"{c.tokens_per_s / base[c.pipeline]:.2f}" if base[c.pipeline] else "-", f"{c.token_p50_ms:.1f}", used,
                          f"{c.mean_drafter_batch:.2f}", f"{c.mean_expert_batch:.2f}")
        console.print(table)
        for c in report.concurrency:
            if c.page_faults_per_round:
                console.print(f"{c.streams} streams, pipelining {c.pipeline}: page faults per round "
                              + ", ".join(f"{name} {faults:,.0f}" for name, faults in c.page_faults_per_round.items()))
            if c.tier_activity:
                console.print(f"{c.streams} streams, pipelining {c.pipeline}: passes ran "
                              + ", ".join(f"{name} {a['busy_share']:.0%} of the wall time"
                                          + (f" (waited for handed-over calls on {a['turn_gathers']:.0f} turns, "
                                             f"{a['turn_gather_ms']:,.0f} ms)" if a["turn_gathers"] else "")
                                          for name, a in c.tier_activity.items()))
            if c.tier_steps:
                console.print(f"{c.streams} streams, pipelining {c.pipeline}: forward passes "
                              + "; ".join(f"{name} " + ", ".join(
                                  f"[red]{count:,} uncaptured[/]" if how == "uncaptured" else f"{count:,} {how}"
                                  for how, count in steps.items() if count and how != "slot_evictions")
                                  + (f", [red]{steps['slot_evictions']:,} slot evictions[/]"
                                     if steps["slot_evictions"] else ", no slot evictions")
                                  for name, steps in c.tier_steps.items()))
        for c in report.concurrency:
            for failure in sorted(set(c.failures)):
                console.print(f"[red]{c.streams} streams, pipelining {c.pipeline}: {c.failures.count(failure)} "
                              f"failed with {failure}[/]")
    if report.load is not None:
        load = report.load
        alone_ttft, alone_itl = statistics.median(load.baseline_ttft_s), statistics.median(load.baseline_itl_s)
        ttft_p95, itl_p95 = percentile(load.ttft_s, 0.95), percentile(load.itl_s, 0.95)
        console.print(
            f"load: {load.streams} streams of {load.prompt_tokens}-token prompts: {load.finished}/{load.requests} "
            f"finished; TTFT p50 {percentile(load.ttft_s, 0.5):.2f} s, p95 {ttft_p95:.2f} s ({ttft_p95 / alone_ttft:.2f}x "
            f"one stream's {alone_ttft:.2f} s); inter-token p50 {1e3 * percentile(load.itl_s, 0.5):.0f} ms, p95 "
            f"{1e3 * itl_p95:.0f} ms ({itl_p95 / alone_itl:.2f}x one stream's median {1e3 * alone_itl:.0f} ms)")
    if report.wire:
        table = Table(title="bytes on the wire per round (16 tokens, first prompt)")
        for column in ("sampling", "rounds", "bytes/round"):
            table.add_column(column, justify="right")
        for mode, (rounds, per_round) in report.wire.items():
            table.add_row(mode, str(rounds), f"{per_round:,.0f}")
        console.print(table)
