"""`speccascade bench tenants` on its tiny models, in a child process: the benchmark starts its own
Ray cluster, which a test session's cluster (tests/serve) would refuse in this process."""

import json
import subprocess
import sys

from .test_soak_bench import child_env


def bench_tenants(out, *options: str) -> subprocess.CompletedProcess:
    """`speccascade bench tenants OPTIONS --out OUT`, in a child process that must succeed."""
    done = subprocess.run([sys.executable, "-m", "speccascade.cli", "bench", "tenants", *options, "--out", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_bench_tenants_runs_every_phase_and_the_quota(tmp_path):
    out = tmp_path / "tenants.json"
    bench_tenants(out, "--seconds", "3", "--flood-clients", "2", "--quota-seconds", "4", "--tokens-per-minute", "600")
    report = json.loads(out.read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    assert list(phases) == ["quiet alone", "beside 2x flood, fair share", "beside 2x flood, FIFO"]
    assert phases["quiet alone"]["flood_requests"] == 0 and phases["quiet alone"]["p95_vs_alone"] == 1.0
    assert all(p["quiet_requests"] > 0 and p["quiet_p50_s"] <= p["quiet_p95_s"] for p in phases.values())
    quota = report["quota"]
    assert quota["tokens_per_minute"] == 600 and quota["delivered"] > 0
    # 10 tokens/s with a 30-token burst: four seconds of saturating clients cannot get much past that.
    assert quota["delivered"] <= 10 * quota["seconds"] + 30 + 4 * 8


def test_bench_tenants_quota_alone_behind_two_router_replicas(tmp_path):
    """One quota for the application: two router replicas share the tenant's bucket (counted per
    replica, the clients would get about twice the bound below)."""
    out = tmp_path / "two-routers.json"
    done = bench_tenants(out, "--phases", "quota", "--router-replicas", "2", "--quota-seconds", "8",
                         "--tokens-per-minute", "600")
    report = json.loads(out.read_text())
    assert report["phases"] == [] and report["settings"]["router_replicas"] == 2
    quota = report["quota"]
    assert quota["delivered"] > 0 and quota["refusals"] > 0
    assert quota["delivered"] <= 10 * quota["seconds"] + 30 + 4 * 8
    assert "quota (2 router replicas)" in done.stdout
