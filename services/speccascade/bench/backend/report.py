"""`bench backend`'s report: the tables and the GPU targets, met or not."""

from __future__ import annotations

from .measure import Report
from .steps import IMPLEMENTATIONS


def check_targets(report: Report, expert: str, drafter: str) -> list[tuple[str, str, bool]]:
    """The issue's GPU targets: (what, measured, met)."""
    out = []
    if not report.steps:
        return out
    context = 512 if 512 in {s.context for s in report.steps} else min(s.context for s in report.steps)
    g1 = report.gamma + 1
    for model in (drafter, expert):
        static, reference = report.step(model, "static", 1, context, 1), report.step(model, "reference", 1, context, 1)
        if static and reference:
            ratio = static.ms_median / reference.ms_median
            out.append((f"{model}: static decode within 10% of the reference (batch 1, ctx {context})",
                        f"{static.ms_median:.2f} vs {reference.ms_median:.2f} ms = {ratio:.2f}x", ratio <= 1.10))
    one, verify = report.step(expert, "static", 1, context, 1), report.step(expert, "static", 1, context, g1)
    if one and verify:
        ratio = verify.ms_median / one.ms_median
        out.append((f"{expert}: {g1}-token verify / 1-token step (static) <= 1.15", f"{ratio:.2f}x", ratio <= 1.15))
    batches = sorted({s.batch for s in report.steps})
    if len(batches) > 1:
        big = report.step(expert, "static", batches[-1], context, 1)
        if one and big:
            ratio = big.ms_median / one.ms_median
            out.append((f"{expert}: batch {batches[-1]} / batch 1 (static) <= 1.6", f"{ratio:.2f}x", ratio <= 1.6))
    for loop in report.loops:
        if loop.backend == "static" and loop.rule == "token":
            out.append((f"{loop.model}: loop at full acceptance >= 0.9 of ideal (static)",
                        f"{loop.efficiency:.2f}", loop.efficiency >= 0.9))
    return out


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]bench backend[/] on {report.device} (torch {report.torch}, transformers "
                  f"{report.transformers}, {report.dtype}, gamma {report.gamma})")
    table = Table(title="ms per step, median [p10-p90]; steps interleaved rep by rep")
    for column in ("model", "batch", "context", "tokens", *IMPLEMENTATIONS, "static / reference"):
        table.add_column(column, justify="right")
    keys = sorted({(s.model, s.batch, s.context, s.tokens) for s in report.steps},
                  key=lambda k: (list(report.models.values()).index(k[0]), k[2], k[1], k[3]))
    for model, batch, context, tokens in keys:
        cells = {i: report.step(model, i, batch, context, tokens) for i in IMPLEMENTATIONS}
        text = [f"{c.ms_median:.2f} [{c.ms_p10:.2f}-{c.ms_p90:.2f}]" if c else "-" for c in cells.values()]
        ratio = (f"{cells['static'].ms_median / cells['reference'].ms_median:.2f}"
                 if cells["static"] and cells["reference"] else "-")
        table.add_row(model, str(batch), str(context), str(tokens), *text, ratio)
    console.print(table)
    drafter, expert = report.models["drafter"], report.models["expert"]
    for error in report.errors:
        console.print(f"[red]error[/] {error}")
    if not report.steps:
        return
    context = report.steps[0].context
    costs = Table(title=f"c = drafter step / expert step (batch 1, context {context}, 1 token)")
    for column in ("implementation", "drafter ms", "expert ms", "c"):
        costs.add_column(column, justify="right")
    for kind in IMPLEMENTATIONS:
        d, e = report.step(drafter, kind, 1, context, 1), report.step(expert, kind, 1, context, 1)
        if d and e:
            costs.add_row(kind, f"{d.ms_median:.2f}", f"{e.ms_median:.2f}", f"{d.ms_median / e.ms_median:.2f}")
    console.print(costs)
    loops = Table(title="the in-process loop, model drafting for itself: ms per round vs ideal "
                        "(gamma 1-token steps + one verify)")
    for column in ("model", "backend", "rule", "acceptance", "rounds", "ms/round", "ideal ms", "ideal / measured"):
        loops.add_column(column, justify="right")
    for loop in report.loops:
        loops.add_row(loop.model, loop.backend, loop.rule, f"{loop.acceptance:.2f}", str(loop.rounds),
                      f"{loop.round_ms_median:.2f}", f"{loop.ideal_round_ms:.2f}", f"{loop.efficiency:.2f}")
    console.print(loops)
    for what, measured, met in check_targets(report, expert, drafter):
        console.print(f"{'[green]met[/]' if met else '[red]not met[/]'}  {what}: {measured}")
