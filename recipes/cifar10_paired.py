"""MAE vs U-MAE on CIFAR-10 with paired seeds, on the CPU or one GPU: the pre-declared 20-epoch
protocol of docs/results/cifar10_e20_protocol.md (`--setting e20`, the default) or its 100-epoch GPU
version (`--setting g100`), then the paired differences with 95% t intervals and the curves. Every
step is the package's own: `main_pretrain.py` (loop, monitors, model builder), `main_linprobe.py`
(the probes); this file only runs them and tabulates their logs.

    python recipes/cifar10_paired.py run              # MAE and U-MAE cls x seeds 0, 1, 2; skips rows in the CSV
    python recipes/cifar10_paired.py run --arms mae,umae_cls,umae_mean   # with the optional third arm
    python recipes/cifar10_paired.py baselines        # the probes at the runs' initial weights; raw pixels
    python recipes/cifar10_paired.py report           # docs/results/cifar10_e20.md (+ curves png) from the CSVs
    python recipes/cifar10_paired.py run --setting g100 --deadline_s 300 --archive $OUT/g100.tar.gz   # one GPU
    SMOKE=1 python recipes/cifar10_paired.py run --out /tmp/smoke   # digits, tiny model, one seed (CI)

`--setting g100`: 100 epochs, batch 1024, lr = blr * batch / 256 = 3e-4 * 1024 / 256 = 1.2e-3, 10
warm-up epochs, bf16 autocast, `--data_backend memory` (the training set decoded once and held on
the GPU), monitors every 10 epochs, the same features, probe and CSV schema; its rows go to
docs/results/cifar10_g100.csv (protocol "g100"). `--deadline_s` stops the run in flight when the
time is up (finished rows are kept; it resumes on the next start) and `--archive` packs the rows,
curves, report and figure (no checkpoints) into one .tar.gz: `benchmarks/gpu_run.sh` is the
prepared GPU session.

Setting (`PROTOCOL` "e20"): ViT-Tiny, 32 px, patch 4, 128-d 2-block decoder, norm-pix, mask 0.75,
batch 128, AdamW (0.9, 0.95), weight decay 0.05, lr 1e-3, 2 warm-up epochs (MAE's 10%) then a
half-cycle cosine to 0 set every step, 20 epochs. Arms: MAE (lambda 0) and U-MAE on the class token
(`--unif_pool cls`, the U-MAE reference's feature), lambda 0.01; on request U-MAE on the mean of the
patch tokens (`umae_mean`, this project's default) and M-MAE (`mmae_cls`). Seeds 0, 1, 2: a seed
gives the same initialisation, data order and augmentations in every arm, so arms are compared
pair by pair.

Features (`umae_plugin.features`, named in every column): `cls` = class token after the final
norm, `mean` = mean of the patch tokens after it, `gpool` = a fresh fc_norm of the un-normed
patch-token mean (the reference `--global_pool` classifier's). Monitors, for every feature: the
online probes (one head each, trained on the masked training pass, evaluated at the end of epochs
5, 10, 15, 20 on masked and unmasked val views), the effective ranks (uncentred and centred) and
uniformity of 1024 fixed val images, and the k-NN monitor (weighted 20-NN of the val images against
a fixed bank of 10,000 training images), at initialisation (epoch 0) and after epochs 5, 10, 15, 20:
one row per monitor point in the curves CSV. Endpoint probe: the same `main_linprobe.py` command
for every arm (only the checkpoint and folder differ: `probe_command`): cached features of all
50,000 training images, a BatchNorm + linear head per feature with LARS, 100 epochs, lr picked from
1.0 x {0.1, 0.3, 1, 3, 10, 30, 100} on a stratified held-out 10% of the training set, and
weighted 20-NN against all 50,000.

Data: `../shared/data/cifar10.tar.gz` (CIFAR-10 as an ImageFolder of JPEGs: the images are
re-encoded, so pixel values differ slightly from the original PNG/pickle release) is unpacked
outside the work tree (`$UMAE_DATA`, default /tmp/umae-data). Run folders live outside the work tree
too (`--out`, default /tmp/umae-runs/cifar10_e20); every step resumes (`--resume auto`, per epoch),
so an interrupted recipe is simply started again. Each finished run appends one row to the CSV and
its monitor points to the curves CSV, each row naming the protocol and the commit of the code that
ran (run it from a frozen copy: `git worktree add` at a fixed commit); with `--commit` both are
committed after every run, in the repository that holds the CSV.

Baselines (`baselines`, `<csv>_baselines.csv`): what the same probes reach without pre-training.
Random initialisation: for each seed, the exact weights the paired runs of that seed start from
(the pre-training model built from the recipe's flags after `torch.manual_seed(seed)`, as
`main_pretrain.py` builds it; tests/test_recipes.py checks it bitwise), probed by the same
`probe_command` as a finished run. Raw pixels (once): the same eval-transformed images flattened,
a logistic regression (scikit-learn, not the LARS probe) and the same 20-NN (`umae_plugin.baselines`).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("umae_plugin") is None:  # a bare checkout: import it from there
    sys.path.insert(0, str(ROOT))

from umae_plugin.analysis import paired  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"
PROTOCOL = "e20"  # docs/results/cifar10_e20_protocol.md; every row names it

ARMS = {  # name -> pre-training flags that differ between arms
    "mae": ["--lambda_unif", "0"],
    "umae_cls": ["--lambda_unif", "0.01", "--unif_pool", "cls"],
    "umae_mean": ["--lambda_unif", "0.01", "--unif_pool", "mean"],
    "mmae_cls": ["--lambda_unif", "0.01", "--unif_pool", "cls", "--reg", "TCR", "--uniformity_mu", "3"],
}
DEFAULT_ARMS = ("mae", "umae_cls")  # umae_mean (the third arm) and mmae_cls on request (--arms)
LABELS = {"mae": ("MAE", "MAE"), "umae_cls": ("U-MAE cls", "cls"), "umae_mean": ("U-MAE mean", "mean"),
          "mmae_cls": ("M-MAE cls", "M-MAE cls")}  # arm -> (table column, short name in differences)
SEEDS = (0,) if SMOKE else (0, 1, 2)
FEATURES = ("cls", "mean", "gpool")  # umae_plugin.features.FEATURES (this file reads no torch at import)

MODEL = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--decoder_embed_dim", "128",
         "--decoder_depth", "2", "--decoder_num_heads", "4", "--norm_pix_loss", "--mask_ratio", "0.75"]
EPOCHS, MONITOR_EVERY = 20, 5
TRAIN = ["--batch_size", "128", "--weight_decay", "0.05", "--lr", "1e-3", "--min_lr", "0", "--warmup_epochs", "2",
         "--epochs", str(EPOCHS)]
MONITORS = ["--online_probe", "--feature_pool", "cls", "--val-interval", str(MONITOR_EVERY), "--erank_freq",
            str(MONITOR_EVERY), "--erank_samples", "1024", "--knn_freq", str(MONITOR_EVERY), "--knn_bank", "10000"]
PROBE = ["--epochs", "100", "--warmup_epochs", "10", "--batch_size", "256", "--lr", "1.0",
         "--lr_factors", "0.1,0.3,1,3,10,30,100"]
if SMOKE:  # digits, a tiny encoder, two epochs: the same code path in seconds
    MODEL = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--embed_dim", "32",
             "--depth", "1", "--num_heads", "2", "--decoder_embed_dim", "16", "--decoder_depth", "1",
             "--decoder_num_heads", "2", "--norm_pix_loss", "--mask_ratio", "0.75"]
    EPOCHS, MONITOR_EVERY = 2, 1
    TRAIN = ["--batch_size", "128", "--weight_decay", "0.05", "--lr", "1e-3", "--min_lr", "0", "--warmup_epochs", "1",
             "--epochs", str(EPOCHS)]
    MONITORS = ["--online_probe", "--feature_pool", "cls", "--val-interval", "1", "--erank_freq", "1",
                "--erank_samples", "64", "--knn_freq", "1", "--knn_bank", "500"]
    PROBE = ["--epochs", "3", "--warmup_epochs", "1", "--batch_size", "256", "--lr", "1.0", "--lr_factors", "0.1,1,10"]

# The GPU setting (`--setting g100`, protocol "g100"): the same arms, features, monitors, probe and CSV
# schema at 100 epochs, batch 1024, lr = blr * batch / 256 = 3e-4 * 1024 / 256 = 1.2e-3, 10 warm-up
# epochs, bf16, the training set held on the GPU (`--data_backend memory`), monitors every 10 epochs.
SETTINGS = {
    "e20": dict(protocol="e20", epochs=EPOCHS, monitor_every=MONITOR_EVERY, train=TRAIN, monitors=MONITORS,
                extra=[], device="cpu", workers="0" if SMOKE else "2"),
    "g100": dict(protocol="g100", epochs=2 if SMOKE else 100, monitor_every=1 if SMOKE else 10,
                 train=(["--batch_size", "128", "--weight_decay", "0.05", "--lr", "1e-3", "--min_lr", "0",
                         "--warmup_epochs", "1", "--epochs", "2"] if SMOKE else
                        ["--batch_size", "1024", "--weight_decay", "0.05", "--blr", "3e-4", "--min_lr", "0",
                         "--warmup_epochs", "10", "--epochs", "100"]),
                 monitors=(MONITORS if SMOKE else
                           ["--online_probe", "--feature_pool", "cls", "--val-interval", "10", "--erank_freq", "10",
                            "--erank_samples", "1024", "--knn_freq", "10", "--knn_bank", "10000"]),
                 extra=["--data_backend", "memory", *([] if SMOKE else ["--amp", "bf16"])],
                 device="cpu" if SMOKE else "cuda", workers="0" if SMOKE else "4"),
}
EXTRA: list[str] = []  # setting-specific pre-training flags (`use_setting`)


def use_setting(name: str, device: str | None = None) -> None:
    """Make `name` the setting every command of this process uses (`--setting`)."""
    global PROTOCOL, EPOCHS, MONITOR_EVERY, TRAIN, MONITORS, EXTRA, DEVICE, WORKERS
    st = SETTINGS[name]
    PROTOCOL, EPOCHS, MONITOR_EVERY = st["protocol"], st["epochs"], st["monitor_every"]
    TRAIN, MONITORS, EXTRA, WORKERS = st["train"], st["monitors"], st["extra"], st["workers"]
    DEVICE = device or st["device"]


# Columns of the CSV (accuracies in percent); `test_*` / `knn_acc1_*` / `probe_lr_*` are the endpoint probe's,
# `knn_monitor_*` the monitor's (10,000-image bank). The schema is pinned by tests/test_recipes.py.
PRETRAIN_KEYS = [
    *(f"online_probe_{v}_acc1_{f}" for f in FEATURES for v in ("masked", "unmasked")),
    *(f"{m}_{f}" for f in FEATURES for m in ("effective_rank", "effective_rank_centered", "unif")),
    *(f"knn_monitor_acc1_{f}" for f in FEATURES), "train_loss_mae", "train_loss_unif",
]
INIT_KEYS = [*(f"{m}_init_{f}" for f in FEATURES for m in ("effective_rank", "effective_rank_centered", "unif")),
             *(f"knn_monitor_acc1_init_{f}" for f in FEATURES)]
PROBE_KEYS = [*(f"test_acc1_{f}" for f in FEATURES), *(f"knn_acc1_{f}" for f in FEATURES),
              *(f"probe_lr_{f}" for f in FEATURES)]
TERM_KEYS = ["train_loss_tcr"]  # arm-specific: M-MAE's term (empty for the other arms)
COLUMNS = ["protocol", "commit", "arm", "seed", "epochs", *PRETRAIN_KEYS, *INIT_KEYS, *PROBE_KEYS, "pretrain_s",
           "probe_s", *TERM_KEYS]
CURVE_KEYS = [*(f"{m}_{f}" for f in FEATURES for m in ("effective_rank", "effective_rank_centered", "unif")),
              *(f"knn_monitor_acc1_{f}" for f in FEATURES),
              *(f"online_probe_{v}_acc1_{f}" for f in FEATURES for v in ("masked", "unmasked")), "train_loss_mae"]
CURVE_COLUMNS = ["protocol", "commit", "arm", "seed", "epoch", *CURVE_KEYS]


def data_root() -> Path:
    """CIFAR-10 as an ImageFolder (train/, val/), unpacked once outside the work tree."""
    base = Path(os.environ.get("UMAE_DATA", "/tmp/umae-data"))
    root = base / "cifar10"
    if not (root / "val").is_dir():
        archive = Path(os.environ.get("CIFAR10_TAR", ROOT.parent / "shared" / "data" / "cifar10.tar.gz"))
        if not archive.is_file():
            sys.exit(f"error: {archive}: no CIFAR-10 archive (set CIFAR10_TAR or UMAE_DATA)")
        base.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(base, filter="data")
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows; a column a row lacks (an older header, or a shorter row) reads as ""."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v if v is not None else "" for k, v in r.items() if k is not None} for r in csv.DictReader(f)]


def read_header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def append_row(path: Path, row: dict, columns: list[str] = COLUMNS) -> None:
    """Append `row`; a CSV started with fewer `columns` first gets the missing ones appended to its
    header (its rows rewritten with them empty, atomically), so the file stays one table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = read_header(path) if path.is_file() else []
    fields = header + [c for c in columns if c not in header]
    if header and fields != header:
        rows = read_rows(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in fields} for r in rows)
        os.replace(tmp, path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not header:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def log_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines() if line.strip()]


class DeadlineReached(Exception):
    """The `--deadline_s` budget ran out while a command ran (it was stopped; its folder resumes)."""


DEADLINE: list[float | None] = [None]  # time.time() by which every command must have ended (`--deadline_s`)


def run(cmd: list[str]) -> float:
    """Run `cmd` in the checkout; past the deadline it is stopped and `DeadlineReached` raised."""
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    timeout = None if DEADLINE[0] is None else DEADLINE[0] - start
    if timeout is not None and timeout <= 0:
        raise DeadlineReached("no time left")
    try:
        subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeadlineReached(f"stopped after {time.time() - start:.0f} s: {' '.join(cmd[1:3])}") from None
    return time.time() - start


WORKERS = "0" if SMOKE else "2"
DEVICE = "cpu"  # --device


def data_flags() -> list[str]:
    return ["--dataset", "digits"] if SMOKE else ["--dataset", "imagefolder", "--data_path", str(data_root())]


def code_commit() -> str:
    """The commit of the code running this recipe (the frozen copy's), "+dirty" if it has changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def probe_command(checkpoint: Path, seed: int, folder: Path) -> list[str]:
    """The endpoint probe, the same for every arm and baseline: only `checkpoint` and `folder`
    differ (and the seed, shared by the arms of a pair). `--cls_token` makes `cls` the headline;
    every feature is probed and logged by name whatever the flag."""
    return [sys.executable, "main_linprobe.py", "--model", "vit_tiny_patch16", "--finetune", str(checkpoint),
            "--cache_features", "--lr_search", "--cls_token", *data_flags(), "--nb_classes", "10", *PROBE,
            "--seed", str(seed), "--device", DEVICE, "--num_workers", WORKERS,
            "--output_dir", str(folder), "--log_dir", str(folder), "--resume", "auto"]


def pretrain_command(arm: str, seed: int, folder: Path) -> list[str]:
    return [sys.executable, "main_pretrain.py", *MODEL, *ARMS[arm], *TRAIN, *EXTRA, *data_flags(), *MONITORS,
            "--seed", str(seed), "--device", DEVICE, "--num_workers", WORKERS, "--save_freq", "1000",
            "--print_freq", "50", "--output_dir", str(folder), "--log_dir", str(folder), "--resume", "auto"]


def monitor_value(line: dict, key: str) -> Any:
    """A log line's value of a CSV monitor key: `knn_monitor_*` is the log's `knn_acc1_*`; online
    probe accuracies are fractions in the log, percent here; "" when absent."""
    name = key.replace("knn_monitor_acc1", "knn_acc1")
    v = line.get(name, "")
    if v != "" and (key.startswith(("online_probe_", "knn_monitor_"))):
        v = 100.0 * float(v)
    return v


def curve_rows(arm: str, seed: int, lines: list[dict], commit: str) -> list[dict]:
    """The monitor points of a run's log: epoch 0 (the `_init_` keys of the first line) and every
    line that holds monitors, at its epochs completed (`epoch` + 1)."""
    base = {"protocol": PROTOCOL, "commit": commit, "arm": arm, "seed": seed}
    rows = [{**base, "epoch": 0, **{k: monitor_value(lines[0], k.replace(f"_{f}", f"_init_{f}"))
                                   for f in FEATURES for k in CURVE_KEYS if k.endswith(f"_{f}")}}]
    for line in lines:
        values = {k: monitor_value(line, k) for k in CURVE_KEYS}
        if any(values[k] != "" for k in CURVE_KEYS if k != "train_loss_mae"):
            rows.append({**base, "epoch": int(line["epoch"]) + 1, **values})
    return rows


def one_run(arm: str, seed: int, out: Path, commit: str) -> tuple[dict, list[dict]]:
    folder = out / f"{arm}_seed{seed}"
    pretrain_s = run(pretrain_command(arm, seed, folder))
    lines = log_lines(folder)
    row: dict = {"protocol": PROTOCOL, "commit": commit, "arm": arm, "seed": seed, "epochs": EPOCHS}
    row.update({k: monitor_value(lines[-1], k) for k in [*PRETRAIN_KEYS, *TERM_KEYS]})
    row.update({k: monitor_value(lines[0], k) for k in INIT_KEYS})
    probe_s = run(probe_command(folder / "checkpoint-last.pth", seed, folder / "linprobe"))
    last = log_lines(folder / "linprobe")[-1]
    row.update({k: last.get(k, "") for k in PROBE_KEYS})
    row.update(pretrain_s=round(pretrain_s), probe_s=round(probe_s))
    return row, curve_rows(arm, seed, lines, commit)


def commit(paths: list[Path], message: str) -> None:
    """Commit only `paths`, in the repository that holds them (the recipe may run from a frozen copy of
    the code while work goes on in the checkout); a busy index is retried, then left for the next run."""
    where = paths[0].resolve().parent
    names = [p.name for p in paths if p.is_file()]
    for _ in range(5):
        if (subprocess.run(["git", "add", "--", *names], cwd=where).returncode == 0
                and subprocess.run(["git", "commit", "-q", "-m", message, "--", *names], cwd=where).returncode == 0):
            return
        time.sleep(10)
    print(f"warning: could not commit {names}; the rows are in the files", flush=True)


def curves_csv(path: Path) -> Path:
    return path.with_name(f"{path.stem}_curves.csv")


def cmd_run(args: argparse.Namespace) -> None:
    """Every (seed, arm) not yet in the CSV, seed-major; with `--deadline_s`, the run in flight when
    it passes is stopped (its folder resumes on the next start), then `report` and `--archive`."""
    if args.deadline_s:
        DEADLINE[0] = time.time() + args.deadline_s
    try:
        run_all(args)
    except DeadlineReached as err:
        print(f"deadline ({args.deadline_s:g} s) reached: {err}; finished rows are kept, the run in flight "
              "resumes on the next start", flush=True)
    finally:
        DEADLINE[0] = None
    if args.archive is not None:
        if read_rows(args.csv):
            cmd_report(args)
        write_archive(args)


def run_all(args: argparse.Namespace) -> None:
    done = {(r["arm"], int(r["seed"])) for r in read_rows(args.csv)}
    commit_id = code_commit()
    for seed in SEEDS:  # seed-major: each finished seed completes a pair as early as possible
        for arm in args.arms:
            if (arm, seed) in done:
                print(f"skip {arm} seed {seed}: in {args.csv}", flush=True)
                continue
            row, curves = one_run(arm, seed, args.out, commit_id)
            for point in curves:
                append_row(curves_csv(args.csv), point, CURVE_COLUMNS)
            append_row(args.csv, row)
            print(f"done {arm} seed {seed}: {row}", flush=True)
            if args.commit:
                commit([args.csv, curves_csv(args.csv)], f"docs/results: CIFAR-10 {PROTOCOL} run {arm} seed {seed}")


# ---------------------------------------------------------------------------------------------
# baselines: the probes without pre-training

BASELINE_COLUMNS = ["protocol", "commit", "baseline", "seed", "feature", "linear_acc1", "knn_acc1", "probe_lr",
                    "seconds"]


def baselines_csv(path: Path) -> Path:
    return path.with_name(f"{path.stem}_baselines.csv")


def initial_weights(seed: int, flags: list[str] | None = None) -> tuple[dict, dict]:
    """(state dict, "model_args" record) of the model `main_pretrain.py` builds from `flags`
    (default: the recipe's MAE arm) with `--seed seed`, before its first step: the record its
    checkpoints carry, built after `torch.manual_seed(seed)` as the run does (one process)."""
    import torch

    from umae_plugin import checkpoint, pretrain
    args = pretrain.get_args_parser().parse_args([*(flags or [*MODEL, *ARMS["mae"], *TRAIN]), "--seed", str(seed)])
    record = pretrain.pretrain_model_args(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = checkpoint.build_model(record)
    return model.state_dict(), record


def raw_pixel_row() -> dict:
    """Raw pixels of the eval-transformed images (the probe's): logistic regression and 20-NN, in %."""
    from umae_plugin import baselines, data
    start = time.time()
    name, path = ("digits", None) if SMOKE else ("imagefolder", data_root())
    train_set, val_set = (data.build_dataset(name, path, split, data.eval_transform(32)) for split in ("train", "val"))
    stats = baselines.raw_pixel_baselines(train_set, val_set, num_classes=10, k=20, temperature=0.07, seed=0,
                                          num_workers=int(WORKERS))
    return {"protocol": PROTOCOL, "baseline": "raw_pixels", "seed": 0, "feature": "pixels",
            "linear_acc1": 100 * stats["raw_pixels_logreg_acc1"], "knn_acc1": 100 * stats["raw_pixels_knn_acc1"],
            "probe_lr": "", "seconds": round(time.time() - start)}


def cmd_baselines(args: argparse.Namespace) -> None:
    from umae_plugin import checkpoint
    path = baselines_csv(args.csv)
    commit_id = code_commit()
    done = {(r["baseline"], int(r["seed"])) for r in read_rows(path)}
    todo = [("raw_pixels", 0)] + [("random_init", seed) for seed in SEEDS]
    for kind, seed in todo:
        if (kind, seed) in done:
            print(f"skip {kind} seed {seed}: in {path}", flush=True)
            continue
        if kind == "raw_pixels":
            rows = [raw_pixel_row()]
        else:
            folder = args.out / f"init_seed{seed}"
            init = folder / "checkpoint-init.pth"
            if not init.is_file():
                state, record = initial_weights(seed)
                folder.mkdir(parents=True, exist_ok=True)
                checkpoint.save_atomic({"model": state, checkpoint.MODEL_ARGS_KEY: record, "epoch": -1}, init)
            seconds = run(probe_command(init, seed, folder / "linprobe"))
            last = log_lines(folder / "linprobe")[-1]
            rows = [{"protocol": PROTOCOL, "baseline": kind, "seed": seed, "feature": f,
                     "linear_acc1": last[f"test_acc1_{f}"], "knn_acc1": last[f"knn_acc1_{f}"],
                     "probe_lr": last[f"probe_lr_{f}"], "seconds": round(seconds)} for f in FEATURES]
        for row in rows:
            row["commit"] = commit_id
            append_row(path, row, BASELINE_COLUMNS)
        print(f"done {kind} seed {seed}: {rows}", flush=True)
        if args.commit:
            commit([path], f"docs/results: CIFAR-10 {PROTOCOL} baseline {kind} seed {seed}")


# ---------------------------------------------------------------------------------------------
# report: paired differences


FEATURE_LABELS = {"cls": "cls", "mean": "mean", "gpool": "gpool"}
PRIMARY = ("test_acc1_cls", "linear probe, cls (%) [primary endpoint]")
REPORTED = [PRIMARY,
            *((f"test_acc1_{f}", f"linear probe, {f} (%)") for f in FEATURES if f != "cls"),
            *((f"knn_acc1_{f}", f"20-NN (50k bank), {f} (%)") for f in FEATURES),
            *((f"online_probe_masked_acc1_{f}", f"online probe, masked views, {f} (%)") for f in FEATURES),
            *((f"online_probe_unmasked_acc1_{f}", f"online probe, unmasked views, {f} (%)") for f in FEATURES),
            *((f"effective_rank_{f}", f"effective rank, {f}") for f in FEATURES),
            *((f"effective_rank_centered_{f}", f"centred effective rank, {f}") for f in FEATURES),
            *((f"unif_{f}", f"uniformity loss, {f}") for f in FEATURES),
            *((f"knn_monitor_acc1_{f}", f"20-NN monitor (10k bank), {f} (%)") for f in FEATURES),
            ("train_loss_mae", "reconstruction loss (last epoch, train)"),
            ("train_loss_tcr", "TCR term, mu 3 (last epoch, train)")]
PER_SEED = ["test_acc1_cls", "test_acc1_mean", "test_acc1_gpool", "knn_acc1_cls", "knn_acc1_mean",
            "online_probe_masked_acc1_cls", "effective_rank_cls", "effective_rank_mean", "probe_lr_cls",
            "probe_lr_mean", "probe_lr_gpool", "commit"]


CURVE_PANELS = [("effective_rank", "effective rank (uncentred)"), ("knn_monitor_acc1", "20-NN monitor top-1 (%)"),
                ("online_probe_unmasked_acc1", "online probe top-1 (%), unmasked val")]
STYLES = {"mae": ("tab:blue", "o", "-"), "umae_cls": ("tab:orange", "s", "--"), "umae_mean": ("tab:green", "^", ":"),
          "mmae_cls": ("tab:red", "D", "-.")}


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def curve_series(curves: list[dict], arm: str, key: str) -> list[tuple[int, float, float, float, int]]:
    """(epoch, mean, min, max, seeds) of `key` over the seeds of `arm` at every monitor epoch."""
    by_epoch: dict[int, list[float]] = {}
    for c in curves:
        if c["arm"] == arm and c.get(key) not in ("", None):
            by_epoch.setdefault(int(c["epoch"]), []).append(float(c[key]))
    return [(e, statistics.fmean(v), min(v), max(v), len(v)) for e, v in sorted(by_epoch.items())]


def plot_curves(curves: list[dict], path: Path) -> bool:
    """Fig. 1c / 3b style: per feature (columns) the effective rank, the 20-NN monitor and the unmasked
    online probe (rows) over pre-training epochs, one marker and line style per arm (offset a little
    so none hides another), mean over seeds with min-max bars. False without matplotlib."""
    try:
        from umae_plugin.analysis import report
    except ImportError as err:
        print(f"warning: no figure ({err}); run `report` where matplotlib is installed", flush=True)
        return False
    arms = [a for a in ARMS if any(c["arm"] == a for c in curves)]
    seeds = sorted({int(c["seed"]) for c in curves})
    fig = report.new_figure(1400, 1000)
    axes = fig.subplots(len(CURVE_PANELS), len(FEATURES), squeeze=False)
    for row, (metric, label) in enumerate(CURVE_PANELS):
        for col, feature in enumerate(FEATURES):
            ax = axes[row][col]
            for k, arm in enumerate(arms):
                series = curve_series(curves, arm, f"{metric}_{feature}")
                if not series:
                    continue
                colour, marker, style = STYLES.get(arm, ("black", "x", "-"))
                shift = (k - (len(arms) - 1) / 2) * 0.05 * MONITOR_EVERY  # so no curve hides another
                ax.errorbar([e + shift for e, *_ in series], [m for _, m, *_ in series],
                            yerr=[[m - lo for _, m, lo, _, _ in series], [hi - m for _, m, _, hi, _ in series]],
                            color=colour, marker=marker, linestyle=style, capsize=3, markersize=4,
                            label=f"{LABELS[arm][0]} ({max(n for *_, n in series)} seed(s))")
            ax.set_xlabel("pre-training epoch")
            ax.set_ylabel(label)
            ax.set_title(f"feature {feature}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    data_name = "digits (SMOKE)" if SMOKE else "CIFAR-10"
    fig.suptitle(f"{data_name}, ViT-Tiny 32 px patch 4, MAE vs U-MAE, protocol {PROTOCOL} ({EPOCHS} epochs), seeds "
                 f"{seeds}; points: mean over seeds, bars: min-max over seeds, arms offset slightly in x\n"
                 f"rank: {int(flag_value(MONITORS, '--erank_samples')):,} fixed val images; 20-NN monitor: the val set "
                 f"against a fixed {int(flag_value(MONITORS, '--knn_bank')):,}-image training bank; online probes "
                 f"(from epoch {MONITOR_EVERY}): unmasked val views", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    report.save_figure(fig, path)
    return True


def cmd_report(args: argparse.Namespace) -> None:
    rows = [r for r in read_rows(args.csv) if r.get("protocol", PROTOCOL) == PROTOCOL]
    if not rows:
        sys.exit(f"error: {args.csv}: no {PROTOCOL} runs yet")
    text = report_text(rows, read_rows(baselines_csv(args.csv)), args.csv.name, args.arms)
    curves = [c for c in read_rows(curves_csv(args.csv)) if c.get("protocol", PROTOCOL) == PROTOCOL]
    png = args.csv.with_name(f"{args.csv.stem}_curves.png")
    if curves and plot_curves(curves, png):
        text += f"\n![{PROTOCOL} curves: rank, 20-NN monitor and online probe per feature]({png.name})\n"
    out = args.csv.with_suffix(".md")
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


def digits(key: str) -> int:  # losses and uniformity values sit near 1: three decimals
    return 3 if key.startswith(("unif", "train_loss")) else 2


def report_text(rows: list[dict], baseline_rows: list[dict], csv_name: str, asked: list[str]) -> str:
    """The report's markdown: per-seed rows, then per arm the mean and the paired differences."""
    seeds = sorted({int(r["seed"]) for r in rows})
    # the default arms, any other asked for or present; arm-specific measures only when some row has them
    arms = [a for a in ARMS if a in DEFAULT_ARMS or a in asked or any(r["arm"] == a for r in rows)]
    others = [a for a in arms if a != "mae"]
    present = {k for r in rows for k, v in r.items() if v not in ("", None)}
    reported = [(k, label) for k, label in REPORTED if k not in TERM_KEYS or k in present]
    per_seed = [k for k in PER_SEED if k not in TERM_KEYS or k in present]

    def cell(r: dict, key: str) -> str:
        if r.get(key) in ("", None):
            return "-"
        return r[key] if key == "commit" else f"{float(r[key]):.{digits(key)}f}"
    lines = [f"CIFAR-10, ViT-Tiny (32 px, patch 4), protocol `{PROTOCOL}` (docs/results/cifar10_e20_protocol.md): "
             f"{EPOCHS} pre-training epochs, paired seeds {seeds}; {len(rows)} of {len(arms) * len(SEEDS)} runs in "
             f"`{csv_name}` (`python recipes/cifar10_paired.py report`). Features: cls = class token after the final "
             "norm, mean = mean of the patch tokens after it, gpool = fresh fc_norm of the un-normed patch-token mean; "
             "every arm is probed by the same command. Linear probes: cached features, lr picked on a held-out 10% "
             "of the training set (`probe_lr`), 100 epochs; accuracies on the 10,000 val images (one accuracy's "
             "binomial standard error is about 0.5 points).", "",
             "Per seed:", "", "| arm | seed | " + " | ".join(per_seed) + " |", "|---|---|" + "---|" * len(per_seed)]
    for r in sorted(rows, key=lambda r: (int(r["seed"]), list(ARMS).index(r["arm"]))):
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(cell(r, k) for k in per_seed) + " |")
    shorts = [LABELS[a][1] for a in others]
    lines += ["", "Per arm: mean over the seeds that arm has finished (per-seed table above). Paired difference: "
              "arm minus MAE on the same seed, mean and 95% t interval over the pairs (one pair: its difference). "
              "Detectable: the true difference a paired t test at 5% would find with 80% power given the pairs' "
              "spread ((t_0.975 + t_0.80) sd / sqrt(n)).", "",
              "| measure | " + " | ".join(LABELS[a][0] for a in arms) + " | "
              + " | ".join(f"{short} - MAE" for short in shorts) + f" | detectable ({', '.join(shorts)}) |",
              "|---|" + "---|" * (len(arms) + len(others) + 1)]
    for key, label in reported:
        means = []
        for arm in arms:
            vals = [float(r[key]) for r in rows if r["arm"] == arm and r.get(key) not in ("", None)]
            means.append(f"{statistics.fmean(vals):.{digits(key)}f}" if vals else "-")
        diffs = [paired.paired_differences(rows, arm, key) for arm in others]
        detect = [paired.detectable_difference(d) for d in diffs]
        intervals = " | ".join(paired.format_interval(d, digits(key)) for d in diffs)
        lines.append(f"| {label} | {' | '.join(means)} | {intervals} | "
                     + ", ".join("-" if x is None else f"{x:.{digits(key)}f}" for x in detect) + " |")
    lines += baseline_table([r for r in baseline_rows if r.get("protocol", PROTOCOL) == PROTOCOL])
    return "\n".join(lines) + "\n"


def baseline_table(rows: list[dict[str, str]]) -> list[str]:
    """The report's baselines: each probe without pre-training, mean over seeds (per seed after)."""
    if not rows:
        return ["", "Baselines (no pre-training): not measured yet (`python recipes/cifar10_paired.py baselines`)."]
    lines = ["", "Baselines without pre-training, the same images and probes (`python recipes/cifar10_paired.py "
             "baselines`): random initialisation is the exact starting weights of each seed's paired runs, "
             "probed by the same command as a finished run; raw pixels use a logistic regression (scikit-learn, "
             "lbfgs, 200 iterations) instead of the LARS probe. Mean over seeds (per seed).", "",
             "| baseline | feature | seeds | linear probe (%) | 20-NN (%) | probe lr |", "|---|---|---|---|---|---|"]
    names = {"random_init": "random initialisation", "raw_pixels": "raw pixels"}
    features = {"cls": "cls", "mean": "mean", "gpool": "gpool", "pixels": "pixels"}
    for kind, feature in dict.fromkeys((r["baseline"], r["feature"]) for r in rows):
        group = sorted((r for r in rows if (r["baseline"], r["feature"]) == (kind, feature)),
                       key=lambda r: int(r["seed"]))

        def summary(key: str) -> str:
            vals = [float(r[key]) for r in group if r.get(key) not in ("", None)]
            if not vals:
                return "-"
            each = f" ({', '.join(f'{v:.2f}' for v in vals)})" if len(vals) > 1 else ""
            return f"{statistics.fmean(vals):.2f}{each}"
        lrs = ", ".join(f"{float(r['probe_lr']):g}" for r in group if r.get("probe_lr") not in ("", None)) or "-"
        seeds = ", ".join(r["seed"] for r in group)
        lines.append(f"| {names.get(kind, kind)} | {features.get(feature, feature)} | {seeds} | "
                     f"{summary('linear_acc1')} | {summary('knn_acc1')} | {lrs} |")
    return lines


ARCHIVE_LIMIT = 16 * 2**20  # what one file from a GPU machine may be


def write_archive(args: argparse.Namespace) -> Path:
    """`--archive`: one .tar.gz of the finished rows, curves, baselines, report and figure (no
    checkpoints), under `ARCHIVE_LIMIT`, written atomically."""
    stem = args.csv.with_suffix("")
    files = [p for p in (args.csv, curves_csv(args.csv), baselines_csv(args.csv), args.csv.with_suffix(".md"),
                         stem.with_name(stem.name + "_curves.png")) if p.is_file()]
    args.archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.archive.with_name(args.archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=p.name)
    if tmp.stat().st_size > ARCHIVE_LIMIT:
        tmp.unlink()
        sys.exit(f"error: {args.archive}: the archive would exceed {ARCHIVE_LIMIT} bytes")
    os.replace(tmp, args.archive)
    print(f"wrote {args.archive}: {', '.join(p.name for p in files)}", flush=True)
    return args.archive


def arm_list(text: str) -> list[str]:
    """`mae,umae_cls,umae_mean,mmae_cls` -> the arms, each known and once."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms or len(set(arms)) != len(arms):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct arms from {', '.join(ARMS)}")
    return arms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "baselines", "report"])
    p.add_argument("--out", type=Path, default=None,
                   help="run folders, outside the work tree (default: $UMAE_RUNS or /tmp/umae-runs/cifar10_<setting>)")
    p.add_argument("--csv", type=Path, default=None,
                   help="one row per arm and seed (default: docs/results/cifar10_e20.csv; <out>/smoke.csv with SMOKE=1); "
                        "the curves go to <csv stem>_curves.csv, the baselines to <csv stem>_baselines.csv")
    p.add_argument("--setting", default="e20", choices=list(SETTINGS),
                   help="e20: the CPU protocol (20 epochs, batch 128); g100: the GPU one (100 epochs, batch 1024, "
                        "bf16, --data_backend memory); each has its own CSV, run folders and protocol name")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where pre-training and probes run (default: the setting's: e20 cpu, g100 cuda)")
    p.add_argument("--deadline_s", type=float, default=0,
                   help="run: stop the run in flight after this many seconds (0: no deadline); finished rows "
                        "are kept and the stopped run resumes on the next start")
    p.add_argument("--archive", type=Path, default=None,
                   help="run: afterwards (also at the deadline) write the rows, curves, report and figure into "
                        "this .tar.gz (no checkpoints; at most 16 MiB)")
    p.add_argument("--commit", action="store_true", help="git-commit the CSV after every finished run (or baseline)")
    p.add_argument("--arms", type=arm_list, default=list(DEFAULT_ARMS), metavar="ARM,ARM,...",
                   help=f"arms to run, in this order (known: {', '.join(ARMS)}); the report adds any arm in the CSV")
    args = p.parse_args()
    use_setting(args.setting, args.device)
    if args.out is None:
        args.out = Path(os.environ.get("UMAE_RUNS", f"/tmp/umae-runs/cifar10_{PROTOCOL}"))
    if args.csv is None:
        args.csv = (args.out / ("smoke.csv" if PROTOCOL == "e20" else f"smoke_{PROTOCOL}.csv") if SMOKE
                    else ROOT / "docs" / "results" / f"cifar10_{PROTOCOL}.csv")
    {"run": cmd_run, "baselines": cmd_baselines, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
