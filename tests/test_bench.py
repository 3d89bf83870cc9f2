"""`vlfit bench` runs offline on the CPU and writes both sides of the comparison as JSON."""

import json
import os
import subprocess
import sys


def test_bench_quick_writes_json_with_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    # --quick at even smaller sizes: this checks that every part runs, not how fast.
    result = subprocess.run(
        [sys.executable, "-m", "vlfit", "bench", "--quick", "--images", "48", "--batch", "16", "--epochs", "1",
         "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())

    assert record["device"].startswith("cpu") and record["versions"]["torch"] and record["versions"]["transformers"]
    assert record["settings"]["backbone"] == "tiny-clip" and record["settings"]["batch"] == 16
    assert record["settings"]["precision"] == "no" and record["settings"]["pipeline"] == "cached"
    data = record["dataset"]
    assert data["images"] == 48 and data["min_side"] >= 100 and data["max_side"] <= 480 and 10 < data["mean_kb"] < 30

    step = record["step"]
    assert step["images_per_s"] > 0 and step["gflop_per_image"] > 0 and step["fraction_of_matmul"] > 0
    assert record["matmul"]["dtype"] == "float32" and record["matmul"]["tflops"] > 0
    vlfit = record["vlfit"]
    assert vlfit["images_per_s"] > 0 and vlfit["cache_build_s"] > 0 and len(vlfit["epoch_s"]) == 1
    assert [t["workers"] for t in record["trainer"]] == sorted({0, len(os.sched_getaffinity(0))})
    assert all(t["images_per_s"] > 0 and t["peak_mem_mb"] > 0 for t in record["trainer"])
    faster = max(t["images_per_s"] for t in record["trainer"])
    assert abs(record["speedup_vs_faster_trainer"] - vlfit["images_per_s"] / faster) < 1e-9

    assert "HF Trainer epoch, 0 loader workers" in result.stdout and "vlfit epoch, cached pipeline" in result.stdout
    assert f"written to {out}" in result.stdout
