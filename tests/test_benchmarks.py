"""The benchmarks' smoke modes end to end: benchmarks/bench_data.py (JPEGs, pipelines, JSON with
ratios to the reference) and benchmarks/gpu_check.sh (SMOKE=1: the CPU stands in for the GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_smoke_writes_ratios_to_the_reference(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["images"]["files"] == 24
    assert 300 <= result["images"]["width_range"][0] and result["images"]["width_range"][1] <= 500
    pipelines = result["pipelines"]
    assert set(pipelines) == {"reference", "pil", "tensor", "gpu_workers", "gpu_on_cpu"}
    assert pipelines["reference"]["ratio_to_reference"] == 1.0
    for name, r in pipelines.items():
        assert r["images_per_s_per_core"] > 0 and len(r["rounds"]) == 2, name
        paired = sorted(v / ref for v, ref in zip(r["rounds"], pipelines["reference"]["rounds"]))
        assert paired[0] - 1e-2 <= r["ratio_to_reference"] <= paired[-1] + 1e-2, name  # a median of the pairs


def test_gpu_check_smoke_mode_runs_on_the_cpu(tmp_path):
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable)  # this interpreter, whatever is first on PATH
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out_dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    files = list(tmp_path.glob("gpu_check_smoke_*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["smoke"] is True and result["matmul"]["tflops"] > 0
    eager = result["model"]["eager"]
    assert eager["flops_per_step"] > 0 and eager["mae"]["images_per_s"] > 0 and eager["umae_over_mae_time"] > 0
    assert eager["attention"]["aten_ops"] and eager["attention"]["kind"] in ("flash", "efficient", "cudnn", "math")
    assert result["model"]["compiled"].startswith("skipped")
    assert set(result["data_path"]) == {"pil", "tensor", "gpu"}
    assert all(r["images_per_s"] > 0 for r in result["data_path"].values())
    gpu = result["main_pretrain"]["runs"]["gpu"]
    assert gpu["train_images_per_s"] > 0 and 0 <= gpu["train_data_wait_frac"] <= 1


def test_gpu_run_script_archives_within_the_device_limits(tmp_path):
    """benchmarks/gpu_run.sh in SMOKE mode with a budget too small for the GPU check: the recipe is
    cut at its deadline, and $OUT holds at most 8 files of at most 16 MiB (the device's limits): the
    archive, the recipe's log and the check's log saying it was skipped."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, OUT=str(out), RUNS=str(tmp_path / "runs"),
               BUDGET_S="20", RECIPE_S="5")
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cifar10_g100.tar.gz", "gpu_check.log", "recipe.log"]
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files) and len(files) <= 8
    assert "deadline (5 s) reached" in (out / "recipe.log").read_text()
    assert "skipped" in (out / "gpu_check.log").read_text()
