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


@pytest.mark.slow  # three short pre-training runs, their probes and the baselines: ~2-3 minutes on 2 CPU cores
def test_paired_recipe_smoke(tmp_path):
    first = recipe("run", out=tmp_path)  # the default arms, MAE and U-MAE cls
    assert first.returncode == 0, first.stderr[-3000:]
    module = load_recipe()
    rows = rows_of(tmp_path / "smoke.csv")
    assert [(r["arm"], r["seed"]) for r in rows] == [("mae", "0"), ("umae_cls", "0")]
    for r in rows:  # every measure was found in the logs; the terms are their arms' alone (MAE logs none)
        empty = [k for k, v in r.items() if v == ""]
        assert empty == (["train_loss_unif", "train_loss_tcr"] if r["arm"] == "mae" else ["train_loss_tcr"]), \
            (r["arm"], empty)
        assert r["protocol"] == "e20" and r["commit"]
        for f in ("cls", "mean", "gpool"):
            assert 0 <= float(r[f"test_acc1_{f}"]) <= 100 and float(r[f"effective_rank_{f}"]) >= 1
    # the curves: epoch 0 (initial weights) and after every epoch (SMOKE monitors every epoch), per run
    curves = rows_of(tmp_path / "smoke_curves.csv")
    assert [(c["arm"], c["epoch"]) for c in curves] == [(a, e) for a in ("mae", "umae_cls") for e in ("0", "1", "2")]
    assert curves[0]["online_probe_masked_acc1_cls"] == ""  # no online probe before training
    assert all(c["knn_monitor_acc1_gpool"] != "" and c["effective_rank_mean"] != "" for c in curves)
    last = {c["arm"]: c for c in curves if c["epoch"] == "2"}
    for r in rows:  # the CSV's final monitors are the curves' last point
        assert r["effective_rank_cls"] == last[r["arm"]]["effective_rank_cls"]
        assert r["knn_monitor_acc1_mean"] == last[r["arm"]]["knn_monitor_acc1_mean"]
    # every arm's probe command: identical but for the checkpoint and folder
    commands = [line for line in first.stdout.splitlines() if line.startswith("+ ") and "main_linprobe.py" in line]
    assert len(commands) == 2
    normalised = {c.replace(f"{arm}_seed0", "RUN") for c, arm in zip(commands, ("mae", "umae_cls"))}
    assert len(normalised) == 1 and "--cls_token" in commands[0] and "--lr_search" in commands[0]
    again = recipe("run", out=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skip ") == 2
    report = recipe("report", out=tmp_path)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "smoke.md").read_text()
    assert "| linear probe, cls (%) [primary endpoint] |" in table and "(one pair)" in table
    assert "| measure | MAE | U-MAE cls |" in table and "U-MAE mean" not in table and "M-MAE" not in table
    assert "TCR" not in table
    assert "Baselines (no pre-training): not measured yet" in table

    base = recipe("baselines", out=tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    rows = rows_of(tmp_path / "smoke_baselines.csv")
    assert [(r["baseline"], r["seed"], r["feature"]) for r in rows] == [
        ("raw_pixels", "0", "pixels"), ("random_init", "0", "cls"), ("random_init", "0", "mean"),
        ("random_init", "0", "gpool")]
    assert all(0 <= float(r["linear_acc1"]) <= 100 and 0 <= float(r["knn_acc1"]) <= 100 for r in rows)
    assert rows[0]["probe_lr"] == "" and float(rows[1]["probe_lr"]) > 0
    probe = [line for line in base.stdout.splitlines() if line.startswith("+ ") and "main_linprobe.py" in line]
    assert probe[0].replace("init_seed0/checkpoint-init.pth", "RUN/checkpoint-last.pth").replace(
        "init_seed0", "RUN") == commands[0].replace("mae_seed0", "RUN")  # the baseline's probe: the runs' command
    assert recipe("baselines", out=tmp_path).stdout.count("skip ") == 2
    recipe("report", out=tmp_path)
    table = (tmp_path / "smoke.md").read_text()
    assert f"| random initialisation | gpool | 0 | {float(rows[3]['linear_acc1']):.2f} |" in table
    assert f"| raw pixels | pixels | 0 | {float(rows[0]['linear_acc1']):.2f} |" in table
    assert module.COLUMNS == list(rows_of(tmp_path / "smoke.csv")[0])


# The e20 CSV's header, pinned: the frozen copy of the code that runs the experiment appends rows with
# it, and later code must keep reading them (`report`). Change it only by appending columns.
E20_COLUMNS = (
    "protocol,commit,arm,seed,epochs,"
    "online_probe_masked_acc1_cls,online_probe_unmasked_acc1_cls,online_probe_masked_acc1_mean,"
    "online_probe_unmasked_acc1_mean,online_probe_masked_acc1_gpool,online_probe_unmasked_acc1_gpool,"
    "effective_rank_cls,effective_rank_centered_cls,unif_cls,effective_rank_mean,effective_rank_centered_mean,"
    "unif_mean,effective_rank_gpool,effective_rank_centered_gpool,unif_gpool,"
    "knn_monitor_acc1_cls,knn_monitor_acc1_mean,knn_monitor_acc1_gpool,train_loss_mae,train_loss_unif,"
    "effective_rank_init_cls,effective_rank_centered_init_cls,unif_init_cls,effective_rank_init_mean,"
    "effective_rank_centered_init_mean,unif_init_mean,effective_rank_init_gpool,effective_rank_centered_init_gpool,"
    "unif_init_gpool,knn_monitor_acc1_init_cls,knn_monitor_acc1_init_mean,knn_monitor_acc1_init_gpool,"
    "test_acc1_cls,test_acc1_mean,test_acc1_gpool,knn_acc1_cls,knn_acc1_mean,knn_acc1_gpool,"
    "probe_lr_cls,probe_lr_mean,probe_lr_gpool,pretrain_s,probe_s,train_loss_tcr").split(",")


def test_e20_csv_schema_is_pinned():
    module = load_recipe()
    assert module.COLUMNS[:len(E20_COLUMNS)] == E20_COLUMNS
    assert set(module.CURVE_COLUMNS[:5]) == {"protocol", "commit", "arm", "seed", "epoch"}
    assert set(module.CURVE_KEYS) <= set(E20_COLUMNS) | {"train_loss_mae"}


def test_protocol_is_what_the_recipe_runs():
    """docs/results/cifar10_e20_protocol.md was written before the runs; the recipe's flags say the same."""
    module = load_recipe()
    text = (ROOT / "docs" / "results" / "cifar10_e20_protocol.md").read_text()
    assert module.EPOCHS == 20 and module.MONITOR_EVERY == 5 and module.DEFAULT_ARMS == ("mae", "umae_cls")
    train = dict(zip(module.TRAIN[::2], module.TRAIN[1::2]))
    assert train == {"--batch_size": "128", "--weight_decay": "0.05", "--lr": "1e-3", "--min_lr": "0",
                     "--warmup_epochs": "2", "--epochs": "20"}
    assert "--lr_factors" in module.PROBE and module.PROBE[module.PROBE.index("--lr_factors") + 1] == \
        "0.1,0.3,1,3,10,30,100"
    for fact in ("20 epochs", "batch 128", "lr 1e-3", "2 warm-up epochs", "0.1, 0.3, 1, 3, 10, 30, 100",
                 "0, 5, 10, 15, 20", "10,000", "50,000", "primary", "U-MAE cls minus MAE"):
        assert fact in text, fact


def test_report_tables_recompute_from_the_csv_independently():
    """The report's per-arm means, paired intervals and detectable effect, recomputed here from the
    rows with a t quantile taken from a table (t_0.975 and t_0.80 at 2 df) and the textbook formulas."""
    import random
    import statistics as st

    module = load_recipe()
    rng = random.Random(0)
    rows = []
    for seed in (0, 1, 2):
        for arm in ("mae", "umae_cls"):
            row = {c: "" for c in module.COLUMNS}
            row.update(protocol="e20", commit="abc", arm=arm, seed=str(seed), epochs="20")
            for key in module.PROBE_KEYS + module.PRETRAIN_KEYS:
                row[key] = f"{rng.uniform(40, 70):.4f}"
            rows.append(row)
    text = module.report_text(rows, [], "x.csv", ["mae", "umae_cls"])
    line = next(ln for ln in text.splitlines() if ln.startswith("| linear probe, cls (%) [primary endpoint] |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    mae = [float(r["test_acc1_cls"]) for r in rows if r["arm"] == "mae"]
    cls = [float(r["test_acc1_cls"]) for r in rows if r["arm"] == "umae_cls"]
    diffs = [b - a for a, b in zip(mae, cls)]
    mean, sd = sum(diffs) / 3, st.stdev(diffs)
    half = 4.303 * sd / 3 ** 0.5
    assert cells[1] == f"{sum(mae) / 3:.2f}" and cells[2] == f"{sum(cls) / 3:.2f}"
    assert cells[3] == f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
    assert cells[4] == f"{(4.303 + 1.061) * sd / 3 ** 0.5:.2f}"
    assert "(one pair)" not in line


def test_g100_setting_stops_at_its_deadline_and_archives_what_finished(tmp_path):
    """The GPU setting's code path on the CPU (SMOKE): a deadline that passes during the first run
    stops it cleanly (exit 0, the run resumes later) and the archive holds no row; a second start
    without a deadline finishes that run and archives rows, curves, report and figure (no checkpoint)."""
    import tarfile

    archive = tmp_path / "results.tar.gz"
    cut = recipe("run", "--setting", "g100", "--deadline_s", "3", "--archive", str(archive), out=tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "deadline (3 s) reached" in cut.stdout and not (tmp_path / "smoke_g100.csv").exists()
    assert "--data_backend memory" in cut.stdout and archive.is_file()
    full = recipe("run", "--setting", "g100", "--arms", "mae", "--archive", str(archive), out=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    rows = rows_of(tmp_path / "smoke_g100.csv")
    assert [(r["arm"], r["protocol"]) for r in rows] == [("mae", "g100")]
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(["smoke_g100.csv", "smoke_g100_curves.csv", "smoke_g100.md", "smoke_g100_curves.png"])
    assert archive.stat().st_size < 16 * 2**20


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
