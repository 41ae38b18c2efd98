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
    assert set(methods) == {"expert-only", "drafter-only", "hf-assisted", "lossless (hf backend)",
                            "lossless (static backend)", "token(alpha=0.5) (static backend)"}
    assert methods["expert-only"]["ratio_to_expert_only"] == 1.0
    assert all(m["tokens"] > 0 and m["seconds"] > 0 for m in methods.values())
    assert methods["drafter-only"]["expert_passes"] == 0 and methods["lossless (hf backend)"]["expert_passes"] > 0
    # Interleaved prompt by prompt: every method has one generation per prompt, and per-prompt ratios.
    assert all(len(m["per_prompt"]) == 2 and len(m["ratio_to_expert_only_per_prompt"]) == 2 for m in methods.values())
    # Both backends decode the same greedy lossless output, so they do the same passes.
    assert (methods["lossless (hf backend)"]["expert_passes"] == methods["lossless (static backend)"]["expert_passes"])
    assert set(report["lossless_vs_hf_assisted"]) == {"hf", "static"}
    assert report["verify_latency"]["long_context"] == 200 and report["verify_latency"]["ratio"] > 0
