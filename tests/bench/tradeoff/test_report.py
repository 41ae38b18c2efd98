"""Aggregation, confidence intervals, the Table-2 logic and plots, on hand-made records."""

from __future__ import annotations

import math

import pytest
from speccascade.bench.tradeoff.report import (
    beats_expert,
    markdown_table,
    mean_interval,
    paired_bootstrap,
    pareto_frontier,
    plot_tradeoff,
    summarize,
    tradeoff_table,
    wilson_interval,
)


def record(method, task, *, passed, wall, alpha=None, drafter=0, expert=10, logprob=-0.5, sampling="greedy",
           tokens_from_drafter=0, tokens_from_expert=10):
    alpha_text = "-" if alpha is None else f"{alpha:g}"
    return {
        "config": f"{method}|a={alpha_text}|{sampling}|g=5|max=64", "task_id": task, "method": method,
        "alpha": alpha, "sampling": sampling, "block_size": 5, "max_new_tokens": 64, "passed": passed,
        "wall_seconds": wall, "drafter_passes": drafter, "expert_passes": expert, "expert_mean_logprob": logprob,
        "generated_tokens": 10, "stats": {"tokens_from_drafter": tokens_from_drafter,
                                          "tokens_from_expert": tokens_from_expert},
    }


def test_step_cost_cross_check_from_lossless_rounds():
    from speccascade.bench.tradeoff.report import step_cost_from_records

    def lossless(task, drafter_passes, drafter_seconds, expert_passes, expert_seconds):
        r = record("lossless", task, passed=True, wall=1.0, drafter=drafter_passes, expert=expert_passes)
        r["stats"] = {"drafter_seconds": drafter_seconds, "expert_seconds": expert_seconds}
        return r

    records = [lossless("T/0", 20, 2.0, 5, 1.5), lossless("T/1", 10, 1.0, 3, 0.5),
               record("expert", "T/0", passed=True, wall=9.0)]
    # drafter: 3 s / 30 passes; expert: 2 s / 8 passes.
    assert step_cost_from_records(records) == pytest.approx((3.0 / 30) / (2.0 / 8))
    assert math.isnan(step_cost_from_records(records[2:]))


def test_wilson_interval_matches_known_values():
    # 8 of 10: the textbook Wilson interval is [0.490, 0.943].
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    # Edges stay inside [0, 1] and are not degenerate.
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.1 < high < 0.2
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(20, 20)[0] > 0.8
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_resamples_problems_with_their_pairs():
    assert paired_bootstrap([0.0] * 10) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([2.0] * 5, [4.0] * 5) == (0.5, 0.5, 0.5)  # every problem 0.5x: no spread
    point, low, high = paired_bootstrap([1.0, 3.0, 1.0, 3.0] * 10, [2.0] * 40)
    assert point == 1.0 and low < 1.0 < high and high - low < 0.5
    # Resampling pairs, not each side alone: perfectly correlated sides give no spread in the ratio.
    assert paired_bootstrap([1.0, 10.0, 100.0], [2.0, 20.0, 200.0])[1:] == pytest.approx((0.5, 0.5))
    assert paired_bootstrap([1.0, 0.0, -1.0]) == paired_bootstrap([1.0, 0.0, -1.0])  # seeded
    assert all(math.isnan(x) for x in paired_bootstrap([]))


def test_a_configuration_better_than_expert_only_is_named():
    records = [record("expert", f"T/{i}", passed=i < 10, wall=10.0) for i in range(20)]
    records += [record("token", f"T/{i}", passed=i < 18, wall=6.0, alpha=0.1) for i in range(20)]  # +8, no loss
    records += [record("chow", f"T/{i}", passed=i < 11, wall=6.0, alpha=0.3) for i in range(20)]  # +1: not significant
    summaries = summarize(records, c=0.4)
    assert [s.label for s in beats_expert(summaries, "greedy", "pass_at_1")] == ["token α=0.1"]
    assert "Better than expert-only (pass@1; the paired 95% interval above 0): token α=0.1 (Δ +0.400 [" in \
        markdown_table(summaries, "greedy")
    only_expert = [r for r in records if r["method"] == "expert"]
    assert "the paired 95% interval above 0): none." in markdown_table(summarize(only_expert, c=0.4), "greedy")


def test_the_pareto_frontier_keeps_the_best_quality_each_cost_buys():
    points = [(1.0, 0.80), (0.5, 0.60), (0.7, 0.60), (0.6, 0.75), (0.9, 0.70), (0.5, 0.55)]
    assert pareto_frontier(points) == [(0.5, 0.60), (0.6, 0.75), (1.0, 0.80)]
    assert pareto_frontier([]) == []


def test_mean_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # stdev = 1.291, se = 0.6455, half = 1.265
    assert high - mean == pytest.approx(1.96 * 1.2909944 / 2, rel=1e-3)
    assert mean - low == pytest.approx(high - mean)
    assert mean_interval([3.0]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(x) for x in mean_interval([]))


def test_relative_latency_and_cost_use_only_common_problems():
    records = [
        record("expert", "T/0", passed=True, wall=10.0, expert=10),
        record("expert", "T/1", passed=False, wall=30.0, expert=30),
        # token has T/0 and T/2; only T/0 is comparable.
        record("token", "T/0", passed=True, wall=4.0, alpha=0.3, drafter=20, expert=4),
        record("token", "T/2", passed=True, wall=1000.0, alpha=0.3, drafter=20, expert=4),
    ]
    summaries = {s.method: s for s in summarize(records, c=0.5)}
    token = summaries["token"]
    assert token.relative_latency == pytest.approx(4.0 / 10.0)
    assert token.relative_cost == pytest.approx((20 * 0.5 + 4) / 10)
    assert token.problems == 2 and token.pass_at_1 == 1.0
    expert = summaries["expert"]
    assert expert.relative_latency == 1.0 and expert.pass_at_1 == 0.5
    assert (expert.pass_low, expert.pass_high) == pytest.approx(wilson_interval(1, 2))


def test_latency_is_a_ratio_of_totals_not_a_mean_of_ratios():
    records = [record("expert", "T/0", passed=True, wall=1.0), record("expert", "T/1", passed=True, wall=9.0),
               record("lossless", "T/0", passed=True, wall=2.0), record("lossless", "T/1", passed=True, wall=3.0)]
    lossless = next(s for s in summarize(records, c=0.4) if s.method == "lossless")
    assert lossless.relative_latency == pytest.approx(5.0 / 10.0)  # the mean of ratios would be 1.17


def test_no_expert_reference_gives_nan_latency_and_the_sampling_groups_are_separate():
    records = [record("expert", "T/0", passed=True, wall=10.0, sampling="greedy"),
               record("token", "T/0", passed=True, wall=5.0, alpha=0.1, sampling="t0.7-p0.95")]
    token = next(s for s in summarize(records, c=0.4) if s.method == "token")
    assert math.isnan(token.relative_latency)


def test_logprob_mean_skips_empty_completions_and_drafter_share():
    records = [record("drafter", "T/0", passed=False, wall=1.0, logprob=-1.0, tokens_from_drafter=10,
                      tokens_from_expert=0),
               record("drafter", "T/1", passed=False, wall=1.0, logprob=None, tokens_from_drafter=10,
                      tokens_from_expert=0),
               record("drafter", "T/2", passed=False, wall=1.0, logprob=-2.0, tokens_from_drafter=0,
                      tokens_from_expert=0)]
    drafter = summarize(records, c=0.4)[0]
    assert drafter.mean_logprob == pytest.approx(-1.5)
    assert drafter.drafter_token_share == 1.0


def _sweep_records():
    """20 problems. Expert passes 12/20 (CI low ~0.39) at 10 s each. token: alpha 0.1 passes 12 at
    6 s, alpha 0.5 passes 9 at 3 s. chow: alpha 0.3 passes 7 at 12 s (slower than expert, never
    reaches). sequence-cascade: passes 11 at 11 s (reaches, but slower)."""
    records = []
    plan = {("expert", None): (12, 10.0), ("token", 0.1): (12, 6.0), ("token", 0.5): (9, 3.0),
            ("chow", 0.3): (5, 12.0), ("sequence-cascade", 0.1): (11, 11.0)}
    for (method, alpha), (passes, wall) in plan.items():
        for i in range(20):
            records.append(record(method, f"T/{i}", passed=i < passes, wall=wall, alpha=alpha))
    return records


def test_table_picks_cheapest_reaching_point_and_best_within_expert_latency():
    summaries = summarize(_sweep_records(), c=0.4)
    expert, rows = tradeoff_table(summaries, "greedy")
    assert expert.pass_at_1 == 0.6
    assert expert.pass_low == pytest.approx(wilson_interval(12, 20)[0])
    by_method = {row.method: row for row in rows}
    token = by_method["token"]
    # 9/20 loses 3 problems, but the paired interval still reaches 0: the faster alpha=0.5 point
    # reaches expert quality.
    assert token.reaches.alpha == 0.5 and token.reaches.relative_latency == pytest.approx(0.3)
    assert token.best_within.alpha == 0.1 and token.best_within.pass_at_1 == 0.6
    chow = by_method["chow"]
    assert chow.reaches is None and chow.best_within is None
    sequence = by_method["sequence-cascade"]
    assert sequence.reaches.relative_latency == pytest.approx(1.1)
    assert sequence.best_within is None
    text = markdown_table(summaries, "greedy")
    assert "| chow | not reached | not reached | none within 1.00× |" in text
    assert "**0.30×**" in text


def test_quality_is_compared_with_expert_problem_by_problem():
    # 20 problems; expert passes T/0..T/11 (12/20, Wilson low 0.387).
    records = [record("expert", f"T/{i}", passed=i < 12, wall=10.0, logprob=-0.5) for i in range(20)]
    # "shifted": as many passes on other problems; "losing": 8/20 = 0.40, above the expert's
    # unpaired lower bound, but it fails 4 problems the expert solves and solves none it does not.
    records += [record("token", f"T/{i}", passed=i >= 8, wall=5.0, alpha=0.1, logprob=-0.5 - 0.1 * (i % 2))
                for i in range(20)]
    records += [record("token", f"T/{i}", passed=i < 8, wall=4.0, alpha=0.5) for i in range(20)]
    summaries = {s.alpha: s for s in summarize(records, c=0.4) if s.method == "token"}
    shifted, losing = summaries[0.1], summaries[0.5]
    assert shifted.pass_delta == 0.0 and shifted.pass_delta_low < 0 < shifted.pass_delta_high
    assert shifted.logprob_delta == pytest.approx(-0.05)
    assert losing.pass_delta == pytest.approx(-0.2)
    # Four -1s in twenty: a resample holds Binomial(20, 0.2) of them, at least 1 in 97.5 % of draws.
    assert losing.pass_delta_low == pytest.approx(-0.4, abs=0.051) and losing.pass_delta_high == pytest.approx(-0.05)
    assert losing.pass_at_1 >= wilson_interval(12, 20)[0]  # the unpaired test would have let it through
    _, rows = tradeoff_table(list(summarize(records, c=0.4)), "greedy")
    token = next(row for row in rows if row.method == "token")
    assert token.reaches.alpha == 0.1  # the faster alpha=0.5 is significantly worse, paired
    expert = next(s for s in summarize(records, c=0.4) if s.method == "expert")
    assert (expert.pass_delta, expert.pass_delta_low, expert.pass_delta_high) == (0.0, 0.0, 0.0)
    assert "Δ +0.000 [" in markdown_table(list(summarize(records, c=0.4)), "greedy")


def test_wall_clock_is_only_compared_within_one_invocation():
    records = [dict(record("expert", f"T/{i}", passed=True, wall=10.0, expert=10), run_id="first")
               for i in range(3)]
    # Added by a later invocation on a slower machine: its cost compares, its seconds do not.
    records += [dict(record("token", f"T/{i}", passed=True, wall=50.0, alpha=0.1, drafter=10, expert=2),
                     run_id="later") for i in range(3)]
    records += [dict(record("token", f"T/{i}", passed=True, wall=6.0, alpha=0.3, drafter=10, expert=4),
                     run_id="first") for i in range(3)]
    summaries = summarize(records, c=0.5)
    later, same = (next(s for s in summaries if s.alpha == a) for a in (0.1, 0.3))
    assert math.isnan(later.relative_latency) and later.relative_cost == pytest.approx((10 * 0.5 + 2) / 10)
    assert same.relative_latency == pytest.approx(0.6)
    _, rows = tradeoff_table(summaries, "greedy")
    token = rows[0]
    assert token.reaches.alpha == 0.3 and token.cheapest.alpha == 0.1
    only_later = [r for r in records if r.get("alpha") != 0.3]
    text = markdown_table(summarize(only_later, c=0.5), "greedy")
    assert "| token | no latency from the expert's run | **0.70×** (α=0.1) | none within 1.00× |" in text


def test_table_without_expert_reference_says_so():
    records = [r for r in _sweep_records() if r["method"] != "expert"]
    summaries = summarize(records, c=0.4)
    assert tradeoff_table(summaries, "greedy") == (None, [])
    assert "No expert-only records" in markdown_table(summaries, "greedy")


@pytest.mark.parametrize("measure", ["pass_at_1", "mean_logprob"])
def test_plot_file_is_written(tmp_path, measure):
    summaries = summarize(_sweep_records(), c=0.4)
    path = plot_tradeoff(summaries, "greedy", measure, tmp_path / "plots" / f"{measure}.png")
    assert path.exists()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_report_only_command_rebuilds_outputs_without_models(tmp_path, capsys):
    import argparse
    import json

    from speccascade.bench.tradeoff import cli as tradeoff

    with (tmp_path / "records.jsonl").open("w") as f:
        for r in _sweep_records():
            f.write(json.dumps({**r, "dtype": "torch.bfloat16"}) + "\n")
    machine = {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "torch": "2.13.0"}
    with (tmp_path / "calibration.jsonl").open("w") as f:
        for c in (0.4, 0.5, 0.6):
            f.write(json.dumps({"c": c, "drafter_step_ms": 100 * c, "expert_step_ms": 100, "machine": machine,
                                "drafter_model": "d", "expert_model": "e"}) + "\n")
    parser = argparse.ArgumentParser()
    tradeoff.register(parser.add_subparsers())
    args = parser.parse_args(["tradeoff", "--report-only", "--out", str(tmp_path)])
    assert args.handler(args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "c = 0.500: median over 3 start-of-run calibration(s)" in table
    assert "test cpu" in table
    assert (tmp_path / "pass-at-1_greedy.png").exists()
    summary = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    token = next(s for s in summary if s["method"] == "token" and s["alpha"] == 0.5)
    assert token["relative_cost"] == pytest.approx(1.0)  # same passes as expert in these records
    assert "## pass@1, greedy" in capsys.readouterr().out


def test_report_can_be_restricted_to_some_problems(tmp_path):
    import json

    from speccascade.bench.tradeoff.cli import write_report

    with (tmp_path / "records.jsonl").open("w") as f:
        for r in _sweep_records():
            f.write(json.dumps({**r, "dtype": "torch.bfloat16"}) + "\n")
    write_report(tmp_path, task_ids={f"T/{i}" for i in range(5)})
    summary = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert {s["problems"] for s in summary} == {5}
    write_report(tmp_path)
    summary = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert {s["problems"] for s in summary} == {20}


def test_chosen_alpha_is_the_fastest_point_as_good_as_expert_else_the_best():
    from speccascade.bench.tradeoff.report import chosen_alphas, markdown_alpha_curves

    records = _sweep_records()  # expert 12/20 at 10 s; token 0.1: 12 at 6 s, 0.5: 9 at 3 s; chow 0.3: 5
    records += [record("token", f"T/{i}", passed=i < 13, wall=8.0, alpha=0.05) for i in range(20)]
    records += [record("chow", f"T/{i}", passed=i < 7, wall=9.0, alpha=0.1) for i in range(20)]
    records += [record("chow", f"T/{i}", passed=i < 7, wall=4.0, alpha=0.5) for i in range(20)]
    summaries = summarize(records, c=0.4)
    chosen = chosen_alphas(summaries, "greedy")
    # token: 0.05 and 0.1 pass at least as many as expert; 0.1 is faster. The faster 0.5 loses 3.
    assert chosen["token"].alpha == 0.1
    # chow never reaches 12: its best pass@1 (7) at the faster of the two alphas that reach it.
    assert chosen["chow"].alpha == 0.5
    assert set(chosen) == {"token", "chow", "sequence-cascade"}  # rules with an alpha only
    text = markdown_alpha_curves(summaries, "greedy")
    assert "**0.1: 12/20, +0.000 [+0.000, +0.000], 0.60×**" in text
    assert "0.05: 13/20" in text and "**0.05: 13/20" not in text
    assert "`--alphas token=0.1 --alphas chow=0.5 --alphas sequence-cascade=0.1`" in text
    assert chosen_alphas([s for s in summaries if s.method != "expert"], "greedy") == {}


def test_combined_report_keeps_each_directory_against_its_own_expert(tmp_path):
    import json

    from speccascade.bench.tradeoff.cli import write_combined_report

    def write(directory, records):
        directory.mkdir()
        with (directory / "records.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    # Two invocations on machines of different speed: each rule's latency against its own expert.
    first = [dict(record("expert", f"T/{i}", passed=True, wall=10.0), run_id="a") for i in range(4)]
    first += [dict(record("lossless", f"T/{i}", passed=True, wall=6.0), run_id="a") for i in range(4)]
    first += [dict(record("token", f"T/{i}", passed=i < 3, wall=5.0, alpha=0.3), run_id="a") for i in range(4)]
    second = [dict(record("expert", f"T/{i}", passed=True, wall=20.0), run_id="b") for i in range(4)]
    second += [dict(record("lossless", f"T/{i}", passed=True, wall=14.0), run_id="b") for i in range(4)]
    second += [dict(record("chow", f"T/{i}", passed=True, wall=11.0, alpha=0.2), run_id="b") for i in range(4)]
    write(tmp_path / "one", first)
    write(tmp_path / "two", second)
    text = write_combined_report([tmp_path / "one", tmp_path / "two"], tmp_path / "out")
    assert "0.2: 4/4, +0.000 [+0.000, +0.000], 0.55×" in text  # chow: 11 s against its own 20 s
    assert "0.3: 3/4" in text and "0.50×" in text  # token: 5 s against 10 s
    assert "lossless 4/4, +0.000 [+0.000, +0.000], 0.60×" in text  # the first directory's lossless
    assert f"| `{tmp_path / 'two'}` (greedy) | 20.0 | 0.70 [0.70, 0.70] |" in text  # each one's yardstick
    assert (tmp_path / "out" / "curves.md").read_text() == text
    assert (tmp_path / "out" / "alpha-curves_pass-at-1_greedy.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no records"):
        write_combined_report([tmp_path / "one", tmp_path / "missing"], tmp_path / "out")


def test_combine_needs_report_only(tmp_path):
    import argparse

    from speccascade.bench.tradeoff import cli as tradeoff

    parser = argparse.ArgumentParser()
    tradeoff.register(parser.add_subparsers())
    args = parser.parse_args(["tradeoff", "--combine", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--report-only"):
        args.handler(args)
