import json

from speccascade.cli import main


def test_bench_engine_reports_every_method_as_a_ratio(tiny_model_dirs, tmp_path):
    drafter, expert = tiny_model_dirs
    out = tmp_path / "engine.json"
    code = main(["bench", "engine", "--drafter", drafter, "--expert", expert, "--dtype", "fp32", "--prompts", "2",
                 "--max-new-tokens", "6", "--repeats", "2", "--short-context", "40", "--long-context", "200",
                 "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == {"expert-only", "drafter-only", "lossless", "token(alpha=0.5)", "hf-assisted"}
    assert methods["expert-only"]["ratio_to_expert_only"] == 1.0
    assert all(m["tokens"] > 0 and m["seconds"] > 0 for m in methods.values())
    assert methods["drafter-only"]["expert_passes"] == 0 and methods["lossless"]["expert_passes"] > 0
    assert report["verify_latency"]["long_context"] == 200 and report["verify_latency"]["ratio"] > 0
