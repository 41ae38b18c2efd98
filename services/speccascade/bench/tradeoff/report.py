"""Turning trade-off records into figures: per-configuration summaries with 95% confidence
intervals, the paper's Table 2 (per method: the cheapest point that reaches expert-only quality, the
best quality within expert-only latency), and quality-vs-latency plots.

Latency and cost of a configuration are relative to expert-only decoding *on the same problems*
(same sampling setting and token budget): the ratio of total seconds (or total cost) over the
problems both have finished. Wall-clock is only compared within one invocation (same `run_id`):
the machine's speed drifts between invocations (by 1.4x on the shared test machine), so a
configuration added in a later invocation has a relative cost but no relative latency.

Quality is compared with expert-only *paired*, problem by problem: every configuration solves the
same problems, so the per-problem difference (pass or fail, log-likelihood) cancels how hard each
problem is, and its 95% interval is far narrower than the gap between two unpaired intervals. A
configuration "reaches expert-only quality" when that interval does not lie wholly below zero.
Paired intervals (the quality differences, and relative latency) are percentile
intervals of a paired bootstrap over problems: resampling problems keeps each problem's pair
together, and needs no normal approximation for a mean of -1/0/+1 differences or for a ratio.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .configs import EXPERT, METHODS
from .records import MEASURED

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # fixed: a report rebuilt from the same records gives the same intervals


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) for no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = Z_95) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval; the interval is the mean itself for n < 2."""
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_bootstrap(values: list[float], reference: list[float] | None = None, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """The statistic and its 95% percentile interval under resampling problems with replacement:
    the mean of `values` (paired differences), or with `reference` the ratio of their sums
    (sum values / sum reference, problem i's values[i] paired with reference[i]). nan for none."""
    if not values:
        return math.nan, math.nan, math.nan
    a = np.asarray(values, dtype=np.float64)
    b = None if reference is None else np.asarray(reference, dtype=np.float64)
    point = float(a.mean()) if b is None else float(a.sum() / b.sum())
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    stats = a[picks].mean(axis=1) if b is None else a[picks].sum(axis=1) / b[picks].sum(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return point, float(low), float(high)


@dataclass(frozen=True)
class ConfigSummary:
    config: str
    method: str
    alpha: float | None
    sampling: str
    block_size: int
    max_new_tokens: int
    problems: int
    passed: int
    pass_at_1: float
    pass_low: float
    pass_high: float
    mean_logprob: float  # mean over problems of the expert's mean log-prob per token
    logprob_low: float
    logprob_high: float
    # Paired differences from expert-only over the common problems, with 95% intervals (nan without
    # an expert reference). pass: mean of (passed - expert passed); logprob: of the per-problem means.
    pass_delta: float
    pass_delta_low: float
    pass_delta_high: float
    logprob_delta: float
    logprob_delta_low: float
    logprob_delta_high: float
    relative_latency: float  # vs expert-only on the common problems of the same run; nan without one
    relative_cost: float  # (drafter passes * c + expert passes) vs expert-only's, same problems
    latency_low: float  # paired-bootstrap 95% interval of relative_latency
    latency_high: float
    seconds_per_problem: float
    output_tokens: float  # mean generated tokens per problem
    drafter_passes: float  # per problem
    expert_passes: float  # per problem
    drafter_token_share: float  # fraction of output tokens that came from the drafter (engine methods)

    @property
    def label(self) -> str:
        return self.method if self.alpha is None else f"{self.method} α={self.alpha:g}"


def reference_group(record: dict) -> tuple:
    """Records comparable with each other: same sampling setting and token budget."""
    return record["sampling"], record["max_new_tokens"]


def step_cost_from_records(records: list[dict], method: str = "lossless") -> float:
    """A cross-check of c from inside a speculative run: seconds per drafter pass over seconds per
    expert (verify) pass, summed over `method`'s records. Drafting and verifying alternate every
    round, so both see the same machine load. nan without such records."""
    # A batched record's call times are its batches' (shared with others), not its own.
    rows = [r for r in records if r["method"] == method and r["drafter_passes"] and r["expert_passes"]
            and r.get("latency", MEASURED) == MEASURED]
    if not rows:
        return math.nan
    drafter_step = sum(r["stats"]["drafter_seconds"] for r in rows) / sum(r["drafter_passes"] for r in rows)
    expert_step = sum(r["stats"]["expert_seconds"] for r in rows) / sum(r["expert_passes"] for r in rows)
    return drafter_step / expert_step


def _cost(record: dict, c: float) -> float:
    return record["drafter_passes"] * c + record["expert_passes"]


def summarize(records: list[dict], c: float) -> list[ConfigSummary]:
    """One summary per configuration, in METHODS order then alpha."""
    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in records:
        by_config[r["config"]][r["task_id"]] = r  # a duplicate (config, task) keeps the later record
    expert_by_group = {reference_group(next(iter(rs.values()))): rs
                       for rs in by_config.values() if next(iter(rs.values()))["method"] == EXPERT}
    summaries = []
    for key, rows in by_config.items():
        first = next(iter(rows.values()))
        values = list(rows.values())
        n = len(values)
        passed = sum(bool(r["passed"]) for r in values)
        low, high = wilson_interval(passed, n)
        logprobs = [r["expert_mean_logprob"] for r in values if r["expert_mean_logprob"] is not None]
        lp, lp_low, lp_high = mean_interval(logprobs)
        reference = expert_by_group.get(reference_group(first), {})
        common = [t for t in rows if t in reference]
        pass_delta = paired_bootstrap([float(bool(rows[t]["passed"])) - float(bool(reference[t]["passed"]))
                                       for t in common])
        logprob_delta = paired_bootstrap([rows[t]["expert_mean_logprob"] - reference[t]["expert_mean_logprob"]
                                          for t in common if rows[t]["expert_mean_logprob"] is not None
                                          and reference[t]["expert_mean_logprob"] is not None])
        same_run = [t for t in common if rows[t].get("run_id") == reference[t].get("run_id")]
        relative_latency, latency_low, latency_high = paired_bootstrap(
            [rows[t]["wall_seconds"] for t in same_run], [reference[t]["wall_seconds"] for t in same_run])
        relative_cost = (sum(_cost(rows[t], c) for t in common)
                         / sum(_cost(reference[t], c) for t in common)) if common else math.nan
        from_drafter = sum(r["stats"].get("tokens_from_drafter", 0) for r in values)
        from_expert = sum(r["stats"].get("tokens_from_expert", 0) for r in values)
        summaries.append(ConfigSummary(
            config=key, method=first["method"], alpha=first["alpha"], sampling=first["sampling"],
            block_size=first["block_size"], max_new_tokens=first["max_new_tokens"], problems=n, passed=passed,
            pass_at_1=passed / n, pass_low=low, pass_high=high,
            mean_logprob=lp, logprob_low=lp_low, logprob_high=lp_high,
            pass_delta=pass_delta[0], pass_delta_low=pass_delta[1], pass_delta_high=pass_delta[2],
            logprob_delta=logprob_delta[0], logprob_delta_low=logprob_delta[1], logprob_delta_high=logprob_delta[2],
            relative_latency=relative_latency, relative_cost=relative_cost,
            latency_low=latency_low, latency_high=latency_high,
            seconds_per_problem=statistics.fmean(r["wall_seconds"] for r in values),
            output_tokens=statistics.fmean(r["generated_tokens"] for r in values),
            drafter_passes=statistics.fmean(r["drafter_passes"] for r in values),
            expert_passes=statistics.fmean(r["expert_passes"] for r in values),
            drafter_token_share=(from_drafter / (from_drafter + from_expert)) if from_drafter + from_expert else math.nan,
        ))
    return sorted(summaries, key=summary_order)


def summary_order(s: ConfigSummary) -> tuple:
    """Sampling setting, token budget, METHODS order, then alpha."""
    method = METHODS.index(s.method) if s.method in METHODS else len(METHODS)
    return s.sampling, s.max_new_tokens, method, -math.inf if s.alpha is None else s.alpha


# Quality measures: (summary field, its 95% interval fields, name in tables and plots).
QUALITY_MEASURES = {
    "pass_at_1": ("pass_at_1", "pass_low", "pass_high", "pass@1"),
    "mean_logprob": ("mean_logprob", "logprob_low", "logprob_high", "expert log-lik./token"),
}
# Their paired differences from expert-only: (difference field, its 95% interval fields).
QUALITY_DELTAS = {
    "pass_at_1": ("pass_delta", "pass_delta_low", "pass_delta_high"),
    "mean_logprob": ("logprob_delta", "logprob_delta_low", "logprob_delta_high"),
}


def reaches_expert(s: ConfigSummary, measure: str) -> bool:
    """Not significantly worse than expert-only: the paired 95% interval of the difference reaches 0."""
    _, _, high_field = QUALITY_DELTAS[measure]
    high = getattr(s, high_field)
    return not math.isnan(high) and high >= 0.0


@dataclass(frozen=True)
class TableRow:
    method: str
    reaches: ConfigSummary | None  # lowest-latency configuration reaching expert-only quality
    cheapest: ConfigSummary | None  # lowest-cost one (cost is comparable across invocations)
    best_within: ConfigSummary | None  # best quality with relative latency <= 1


def tradeoff_table(summaries: list[ConfigSummary], sampling: str, measure: str = "pass_at_1",
                   max_new_tokens: int | None = None) -> tuple[ConfigSummary | None, list[TableRow]]:
    """Table 2 for one sampling setting: per method, (a) the lowest relative latency among its
    configurations that reach expert-only quality (`reaches_expert`: the paired 95% interval of the
    difference reaches 0), (b) its best quality among configurations no slower than expert-only.

    Returns the expert-only summary (None if missing: then nothing can be compared) and the rows."""
    value_field = QUALITY_MEASURES[measure][0]
    rows_here = [s for s in summaries if s.sampling == sampling
                 and (max_new_tokens is None or s.max_new_tokens == max_new_tokens)]
    expert = next((s for s in rows_here if s.method == EXPERT), None)
    if expert is None:
        return None, []
    table = []
    for method in [m for m in METHODS if m != EXPERT]:
        points = [s for s in rows_here if s.method == method and not math.isnan(s.relative_cost)
                  and not math.isnan(getattr(s, value_field))]
        if not points:
            continue
        reaching = [s for s in points if reaches_expert(s, measure)]
        timed = [s for s in reaching if not math.isnan(s.relative_latency)]
        within = [s for s in points if s.relative_latency <= 1.0]  # False for nan
        table.append(TableRow(
            method=method,
            reaches=min(timed, key=lambda s: (s.relative_latency, -getattr(s, value_field)), default=None),
            cheapest=min(reaching, key=lambda s: (s.relative_cost, -getattr(s, value_field)), default=None),
            best_within=max(within, key=lambda s: (getattr(s, value_field), -s.relative_latency), default=None),
        ))
    return expert, table


def _fmt_quality(s: ConfigSummary, measure: str) -> str:
    value_field, low_field, high_field, _ = QUALITY_MEASURES[measure]
    if measure == "pass_at_1":
        return f"{s.pass_at_1:.3f} [{s.pass_low:.3f}, {s.pass_high:.3f}]"
    return f"{getattr(s, value_field):.3f} [{getattr(s, low_field):.3f}, {getattr(s, high_field):.3f}]"


def _fmt_delta(s: ConfigSummary, measure: str) -> str:
    """The paired difference from expert-only, e.g. `-0.050 [-0.118, +0.018]`."""
    value_field, low_field, high_field = QUALITY_DELTAS[measure]
    value = getattr(s, value_field)
    if math.isnan(value):
        return "–"
    return f"{value:+.3f} [{getattr(s, low_field):+.3f}, {getattr(s, high_field):+.3f}]"


def _fmt_ratio(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def _fmt_ratio_interval(value: float, low: float, high: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _fmt_alpha(s: ConfigSummary) -> str:
    return "–" if s.alpha is None else f"{s.alpha:g}"


def markdown_table(summaries: list[ConfigSummary], sampling: str, measure: str = "pass_at_1") -> str:
    expert, rows = tradeoff_table(summaries, sampling, measure)
    name = QUALITY_MEASURES[measure][3]
    if expert is None:
        return f"_No expert-only records for {sampling}: nothing to compare against._\n"
    lines = [
        f"Expert-only ({sampling}): {name} = {_fmt_quality(expert, measure)} over {expert.problems} problems, "
        f"{expert.seconds_per_problem:.1f} s/problem.",
        "",
        f"| method | lowest rel. latency reaching expert-only {name} (α; {name}; Δ vs expert, paired; rel. cost) "
        f"| lowest rel. cost reaching it (α) | best {name} within expert-only latency (α; rel. latency) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row.reaches is None:
            reach = "not reached" if row.cheapest is None else "no latency from the expert's run"
        else:
            s = row.reaches
            reach = (f"**{s.relative_latency:.2f}×** [{s.latency_low:.2f}, {s.latency_high:.2f}] "
                     f"(α={_fmt_alpha(s)}; {_fmt_quality(s, measure)}; "
                     f"Δ {_fmt_delta(s, measure)}; {s.relative_cost:.2f}×)")
        if row.best_within is None:
            best = "none within 1.00×"
        else:
            s = row.best_within
            best = f"**{_fmt_quality(s, measure)}** (α={_fmt_alpha(s)}; {s.relative_latency:.2f}×)"
        cheapest = ("not reached" if row.cheapest is None
                    else f"**{row.cheapest.relative_cost:.2f}×** (α={_fmt_alpha(row.cheapest)})")
        lines.append(f"| {row.method} | {reach} | {cheapest} | {best} |")
    lines += ["", f"Better than expert-only ({name}; the paired 95% interval above 0): "
              + (", ".join(f"{s.label} (Δ {_fmt_delta(s, measure)})" for s in beats_expert(summaries, sampling, measure))
                 or "none") + "."]
    return "\n".join(lines) + "\n"


def beats_expert(summaries: list[ConfigSummary], sampling: str, measure: str) -> list[ConfigSummary]:
    """Configurations significantly better than expert-only: the paired interval of the difference
    lies wholly above 0."""
    _, low_field, _ = QUALITY_DELTAS[measure]
    return [s for s in summaries if s.sampling == sampling and s.method != EXPERT
            and not math.isnan(getattr(s, low_field)) and getattr(s, low_field) > 0.0]


def markdown_summary(summaries: list[ConfigSummary]) -> str:
    lines = [
        "| sampling | method | α | n | pass@1 [95% CI] | Δpass@1 vs expert [paired 95% CI] "
        "| expert log-lik./token [95% CI] | Δlog-lik. vs expert [paired 95% CI] | rel. latency [paired 95% CI] "
        "| rel. cost | s/problem | tokens | drafter passes | expert passes | drafter token share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        share = "–" if math.isnan(s.drafter_token_share) else f"{s.drafter_token_share:.2f}"
        lines.append(
            f"| {s.sampling} | {s.method} | {_fmt_alpha(s)} | {s.problems} | {_fmt_quality(s, 'pass_at_1')} "
            f"| {_fmt_delta(s, 'pass_at_1')} | {_fmt_quality(s, 'mean_logprob')} | {_fmt_delta(s, 'mean_logprob')} "
            f"| {_fmt_ratio_interval(s.relative_latency, s.latency_low, s.latency_high)} "
            f"| {_fmt_ratio(s.relative_cost)} | {s.seconds_per_problem:.1f} | {s.output_tokens:.0f} | {s.drafter_passes:.0f} "
            f"| {s.expert_passes:.0f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both counts (lower cost, higher quality), by cost: the
    best quality each cost buys."""
    frontier: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or y > frontier[-1][1]:
            frontier.append((x, y))
    return frontier


def plot_tradeoff(summaries: list[ConfigSummary], sampling: str, measure: str, path: Path, *,
                  label_alphas: bool = False) -> Path:
    """Quality vs relative latency (left), vs relative machine-independent cost (middle) and vs
    expert calls per problem (right), one curve per method, expert-only as a star with its 95% band;
    `label_alphas` writes each point's α beside it on the latency panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value_field, low_field, high_field, name = QUALITY_MEASURES[measure]
    here = [s for s in summaries if s.sampling == sampling and not math.isnan(getattr(s, value_field))]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), sharey=True)
    markers = "osD^vP<>Xhd"  # distinct shapes, since points of different methods often coincide
    panels = ((axes[0], "relative_latency", "wall-clock latency relative to expert-only"),
              (axes[1], "relative_cost", "cost relative to expert-only (drafter passes·c + expert passes)"),
              (axes[2], "expert_passes", "expert calls per problem"))
    for ax, x_field, x_name in panels:
        placed = [s for s in here if not math.isnan(getattr(s, x_field))]
        for number, method in enumerate(METHODS):
            # A curve joins a rule's points in alpha order where alphas are labelled, else by cost.
            points = sorted((s for s in placed if s.method == method),
                            key=(lambda s: s.alpha or 0.0) if label_alphas else (lambda s: getattr(s, x_field)))
            if not points:
                continue
            xs = [getattr(s, x_field) for s in points]
            ys = [getattr(s, value_field) for s in points]
            if method == EXPERT:
                e = points[0]
                ax.axhspan(getattr(e, low_field), getattr(e, high_field), color="grey", alpha=0.15)
                ax.plot(xs, ys, marker="*", markersize=14, linestyle="none", color="black", label="expert-only")
                continue
            line, = ax.plot(xs, ys, marker=markers[number % len(markers)], markersize=5, linewidth=1.2, alpha=0.85,
                            label=method)
            if x_field == "relative_latency":  # the paired-bootstrap interval of each point's latency
                ax.errorbar(xs, ys, xerr=[[x - s.latency_low for x, s in zip(xs, points)],
                                          [s.latency_high - x for x, s in zip(xs, points)]],
                            fmt="none", ecolor=line.get_color(), alpha=0.35, linewidth=0.8)
                if label_alphas:
                    for x, y, s in zip(xs, ys, points):
                        if s.alpha is not None:
                            ax.annotate(f"{s.alpha:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                                        fontsize=6, color=line.get_color())
        frontier = pareto_frontier([(getattr(s, x_field), getattr(s, value_field)) for s in placed])
        if len(frontier) > 1:
            ax.step(*zip(*frontier), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto frontier")
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{name} (HumanEval)")
    n = max((s.problems for s in here), default=0)
    fig.suptitle(f"Quality vs cost, {sampling}, up to {n} problems (band: expert-only 95% CI; bars: paired 95% CI)")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chosen_alphas(summaries: list[ConfigSummary], sampling: str, measure: str = "pass_at_1"
                  ) -> dict[str, ConfigSummary]:
    """Per method with an α grid, the point to run on every problem: the lowest relative latency
    among its points at least as good as expert-only on the grid's problems (pass@1: as many
    problems passed); where none is, its best quality (ties: the faster). Points without a
    relative latency are left out."""
    value_field = QUALITY_MEASURES[measure][0]
    here = [s for s in summaries if s.sampling == sampling and not math.isnan(s.relative_latency)]
    expert = next((s for s in here if s.method == EXPERT), None)
    if expert is None:
        return {}
    chosen = {}
    for method in METHODS:
        points = [s for s in here if s.method == method and s.alpha is not None]
        if not points:
            continue
        as_good = [s for s in points if getattr(s, value_field) >= getattr(expert, value_field)]
        chosen[method] = (min(as_good, key=lambda s: s.relative_latency) if as_good
                          else max(points, key=lambda s: (getattr(s, value_field), -s.relative_latency)))
    return chosen


def markdown_alpha_curves(summaries: list[ConfigSummary], sampling: str, measure: str = "pass_at_1") -> str:
    """Each α rule's curve as one row (α: quality, paired Δ, relative latency), the chosen point in
    bold, and the `--alphas` arguments that run the chosen points."""
    value_field, _, _, name = QUALITY_MEASURES[measure]
    here = [s for s in summaries if s.sampling == sampling]
    expert = next((s for s in here if s.method == EXPERT), None)
    if expert is None:
        return f"_No expert-only records for {sampling}: nothing to compare against._\n"
    chosen = chosen_alphas(summaries, sampling, measure)
    passed = measure == "pass_at_1"

    def quality(s: ConfigSummary) -> str:
        return f"{s.passed}/{s.problems}" if passed else f"{getattr(s, value_field):.3f}"

    lines = [f"Expert-only ({sampling}): {name} {_fmt_quality(expert, measure)} over {expert.problems} problems. "
             f"Each cell: α: {name}" + (" (problems passed)" if passed else "")
             + "; Δ vs expert, paired; relative latency. Bold: the chosen point (`chosen_alphas`).", "",
             "| method | points |", "|---|---|"]
    for method in METHODS:
        points = sorted((s for s in here if s.method == method and s.alpha is not None), key=lambda s: s.alpha)
        if not points:
            continue
        cells = []
        for s in points:
            cell = f"{s.alpha:g}: {quality(s)}, {_fmt_delta(s, measure)}, {_fmt_ratio(s.relative_latency)}×"
            cells.append(f"**{cell}**" if chosen.get(method) is s else cell)
        lines.append(f"| {method} | " + "; ".join(cells) + " |")
    others = [s for s in here if s.alpha is None and s.method != EXPERT]
    if others:
        lines += ["", "Without α: " + "; ".join(
            f"{s.method} {quality(s)}, {_fmt_delta(s, measure)}, {_fmt_ratio(s.relative_latency)}×" for s in others) + "."]
    lines += ["", "Chosen points as arguments: `" + " ".join(
        f"--alphas {method}={s.alpha:g}" for method, s in chosen.items()) + "`"]
    return "\n".join(lines) + "\n"


def summary_records(summaries: list[ConfigSummary], c: float) -> list[dict]:
    return [{**asdict(s), "c": c} for s in summaries]


def markdown_batched(runs: list[dict], checks: list[dict]) -> str:
    """The batched runs' throughput against decoding alone, and the latency model's check: modelled
    / measured single-stream latency of the batched pairs decoded alone again, per method."""
    lines = ["| run | at once | generations | expert calls per pass | drafter calls per pass | decoding s "
             "| single-stream s (modelled) | throughput gain |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        per_pass = run["calls_per_batch"]
        lines.append(f"| {run['run_id']} | {run['concurrency']} | {run['requests'] - run.get('failed', 0)} "
                     f"| {per_pass['expert']:.1f} | {per_pass['drafter']:.1f} | {run['decode_s']:.0f} "
                     f"| {run['modelled_single_stream_s']:.0f} | **{run['throughput_gain']:.2f}×** |")
    if checks:
        by_method: dict[str, list[float]] = defaultdict(list)
        for row in checks:
            by_method[row["method"]].append(row["ratio"])
        ratios = [row["ratio"] for row in checks]
        identical = sum(bool(row["identical"]) for row in checks)
        lines += ["", f"Latency model check: {len(checks)} batched problems decoded alone again; modelled / "
                      f"measured latency median **{statistics.median(ratios):.2f}** "
                      f"[{min(ratios):.2f}–{max(ratios):.2f}] ("
                  + ", ".join(f"{method} {statistics.median(values):.2f}" for method, values in by_method.items())
                  + f"); identical outputs {identical}/{len(checks)}."]
    return "\n".join(lines)
