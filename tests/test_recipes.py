"""The CIFAR-10 paired recipe in its SMOKE mode (digits, a tiny encoder, one seed): every arm runs,
the CSV gets one row per arm, a second start skips them, the optional M-MAE arm joins on request, and
the report pairs them. A CSV started before a column existed takes it without losing a row."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def recipe(*argv, out):
    env = dict(os.environ, SMOKE="1")
    return subprocess.run([sys.executable, "recipes/cifar10_paired.py", *argv, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # four pre-training runs and their probes: minutes on 2 CPU cores
def test_paired_recipe_smoke(tmp_path):
    first = recipe("run", out=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = rows_of(tmp_path / "smoke.csv")
    assert [(r["arm"], r["seed"]) for r in rows] == [("mae", "0"), ("umae_cls", "0"), ("umae_mean", "0")]
    for r in rows:  # every measure was found in the logs; M-MAE's term is M-MAE's arm's alone
        empty = [k for k, v in r.items() if v == ""]
        assert empty == ["train_loss_tcr"], (r["arm"], empty)
        assert 0 <= float(r["test_acc1_mean"]) <= 100 and float(r["effective_rank_cls"]) >= 1
    again = recipe("run", out=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skip ") == 3
    report = recipe("report", out=tmp_path)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "smoke.md").read_text()
    assert "| linear probe, mean pool (%) |" in table and "(one pair)" in table
    assert "M-MAE" not in table and "TCR" not in table  # the three-arm report as before

    mmae = recipe("run", "--arms", "mae,umae_cls,umae_mean,mmae_cls", out=tmp_path)
    assert mmae.returncode == 0, mmae.stderr[-3000:]
    assert mmae.stdout.count("skip ") == 3 and "--reg TCR --uniformity_mu 3" in mmae.stdout
    row = rows_of(tmp_path / "smoke.csv")[3]
    assert row["arm"] == "mmae_cls" and [k for k, v in row.items() if v == ""] == []
    assert float(row["train_loss_tcr"]) < 0
    recipe("report", out=tmp_path)
    table = (tmp_path / "smoke.md").read_text()
    assert "| measure | MAE | U-MAE cls | U-MAE mean | M-MAE cls |" in table
    assert "| TCR term, mu 3 (last epoch, train) | - | - | - |" in table
    assert "Baselines (no pre-training): not measured yet" in table

    base = recipe("baselines", out=tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    rows = rows_of(tmp_path / "smoke_baselines.csv")
    assert [(r["baseline"], r["seed"], r["feature"]) for r in rows] == [
        ("raw_pixels", "0", "pixels"), ("random_init", "0", "cls"), ("random_init", "0", "mean")]
    assert all(0 <= float(r["linear_acc1"]) <= 100 and 0 <= float(r["knn_acc1"]) <= 100 for r in rows)
    assert rows[0]["probe_lr"] == "" and float(rows[1]["probe_lr"]) > 0
    assert recipe("baselines", out=tmp_path).stdout.count("skip ") == 2
    recipe("report", out=tmp_path)
    table = (tmp_path / "smoke.md").read_text()
    assert f"| random initialisation | mean pool | 0 | {float(rows[2]['linear_acc1']):.2f} |" in table
    assert f"| raw pixels | pixels | 0 | {float(rows[0]['linear_acc1']):.2f} |" in table


def test_unknown_arm_is_refused(tmp_path):
    proc = recipe("run", "--arms", "mae,mmae", out=tmp_path)
    assert proc.returncode == 2 and "give distinct arms from" in proc.stderr


def load_recipe():
    spec = importlib.util.spec_from_file_location("cifar10_paired", ROOT / "recipes" / "cifar10_paired.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # one short pre-training run: ~20 s on 2 CPU cores
def test_random_init_baseline_is_the_runs_exact_starting_weights(tmp_path):
    """A pre-training run at lr 0 keeps its initial weights (AdamW moves nothing at lr 0): its
    checkpoint must equal, bitwise, what the baseline builds for the same flags and seed."""
    import torch

    from umae_plugin import checkpoint
    flags = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--embed_dim", "32",
             "--depth", "1", "--num_heads", "2", "--decoder_embed_dim", "16", "--decoder_depth", "1",
             "--decoder_num_heads", "2", "--norm_pix_loss", "--lambda_unif", "0", "--batch_size", "128",
             "--epochs", "1", "--lr", "0", "--dataset", "digits"]
    proc = subprocess.run([sys.executable, "main_pretrain.py", *flags, "--seed", "3", "--device", "cpu",
                           "--num_workers", "0", "--erank_freq", "0", "--output_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = checkpoint.torch_load(tmp_path / "checkpoint-last.pth")
    state, record = load_recipe().initial_weights(3, flags)
    assert record == saved["model_args"] and state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
    other, _ = load_recipe().initial_weights(4, flags)  # and the seed matters
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_a_csv_started_without_a_column_takes_it_and_keeps_its_rows(tmp_path):
    recipe_module = load_recipe()
    old_columns = [c for c in recipe_module.COLUMNS if c != "train_loss_tcr"]  # the header before M-MAE's arm
    path = tmp_path / "paired.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({"arm": "mae", "seed": 0, "test_acc1_mean": 55.9, "probe_s": 808})
    recipe_module.append_row(path, {"arm": "mmae_cls", "seed": 0, "test_acc1_mean": 50.0, "train_loss_tcr": -30.5})
    with open(path, "a", newline="") as f:  # a copy of the recipe started before the change appends on
        csv.DictWriter(f, fieldnames=old_columns).writerow({"arm": "umae_mean", "seed": 0, "probe_s": 900})
    assert next(csv.reader(open(path))) == recipe_module.COLUMNS
    rows = recipe_module.read_rows(path)
    assert [(r["arm"], r["test_acc1_mean"], r["probe_s"], r["train_loss_tcr"]) for r in rows] == [
        ("mae", "55.9", "808", ""), ("mmae_cls", "50.0", "", "-30.5"), ("umae_mean", "", "900", "")]
