import json

from speccascade.cli import main


def test_bench_tenants_runs_every_phase_and_the_quota(tmp_path):
    out = tmp_path / "tenants.json"
    assert main(["bench", "tenants", "--seconds", "3", "--flood-clients", "2", "--quota-seconds", "4",
                 "--tokens-per-minute", "600", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    assert list(phases) == ["quiet alone", "beside 2x flood, fair share", "beside 2x flood, FIFO"]
    assert phases["quiet alone"]["flood_requests"] == 0 and phases["quiet alone"]["p95_vs_alone"] == 1.0
    assert all(p["quiet_requests"] > 0 and p["quiet_p50_s"] <= p["quiet_p95_s"] for p in phases.values())
    quota = report["quota"]
    assert quota["tokens_per_minute"] == 600 and quota["delivered"] > 0
    # 10 tokens/s with a 30-token burst: four seconds of saturating clients cannot get much past that.
    assert quota["delivered"] <= 10 * quota["seconds"] + 30 + 4 * 8
