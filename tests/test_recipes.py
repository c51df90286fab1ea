"""The CIFAR-10 paired recipe in its SMOKE mode (digits, a tiny encoder, one seed): every arm runs,
the CSV gets one row per arm, a second start skips them, and the report pairs them."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe(*argv, out):
    env = dict(os.environ, SMOKE="1")
    return subprocess.run([sys.executable, "recipes/cifar10_paired.py", *argv, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_paired_recipe_smoke(tmp_path):
    first = recipe("run", out=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], r["seed"]) for r in rows] == [("mae", "0"), ("umae_cls", "0"), ("umae_mean", "0")]
    for r in rows:  # every measure was found in the logs
        empty = [k for k, v in r.items() if v == ""]
        assert empty == [], (r["arm"], empty)
        assert 0 <= float(r["test_acc1_mean"]) <= 100 and float(r["effective_rank_cls"]) >= 1
    again = recipe("run", out=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skip ") == 3
    report = recipe("report", out=tmp_path)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "smoke.md").read_text()
    assert "| linear probe, mean pool (%) |" in table and "(one pair)" in table
