"""`python -m bench --json` on tiny models and sizes: every key docs/performance.md and the integrator read is there,
with plausible values (the numbers themselves are measured on real models by the bench itself)."""

import json

import pytest

import bench.__main__ as bench

KEPT = ("pipeline_p50_ms", "pipeline_p95_ms", "baseline_p50_ms", "speedup", "machine")


def test_bench_json_keys_on_tiny_models(fake_models, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("XRAY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert bench.main(["--models", str(fake_models), "--quick", "--no-worker", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in KEPT:
        assert key in report
    assert report["pipeline_p50_ms"] > 0 and report["speedup"] > 0
    assert len(report["load_average"]["start"]) == 3 and len(report["load_average"]["end"]) == 3
    assert set(report["model_latency_ms"]) == {"torch", "onnx", "openvino", "openvino-bf16"}
    for per_model in report["model_latency_ms"].values():
        assert set(per_model) == {"gate", "body_part", "chest"}
        assert all(set(v) == {"batch 1", "batch 8"} and min(v.values()) > 0 for v in per_model.values())
    assert set(report["model_stage_images_per_s"]) == {"1", "8"}  # 1/8/32/128 with --device cuda
    e2e = report["batched_end_to_end"]
    assert e2e["images_per_s"] > 0 and e2e["producers"] == 8 and 1 <= e2e["mean_batch"] <= e2e["max_batch"]
    assert "worker_images_per_s" not in report  # --no-worker

