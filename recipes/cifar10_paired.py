"""MAE vs U-MAE on CIFAR-10 with paired seeds (CPU budget): three arms x three seeds, then the
paired differences with 95% t intervals; M-MAE as an optional fourth arm.

    python recipes/cifar10_paired.py run              # all nine runs; skips those already in the CSV
    python recipes/cifar10_paired.py run --arms mae,umae_cls,umae_mean,mmae_cls   # with the M-MAE arm
    python recipes/cifar10_paired.py baselines        # the probes at the runs' initial weights; raw pixels
    python recipes/cifar10_paired.py report           # docs/results/cifar10_paired.md from the CSV(s)
    SMOKE=1 python recipes/cifar10_paired.py run --out /tmp/smoke   # digits, tiny model, one seed (CI)

Setting (the evidence issue's): ViT-Tiny, 32 px, patch 4, 128-d 2-block decoder, norm-pix, mask
0.75, batch 128, weight decay 0.05, lr 1e-3, 1 warm-up epoch, 4 epochs. Arms: MAE (lambda 0),
U-MAE on the class token (`--unif_pool cls`, the U-MAE reference's feature) and U-MAE on the mean of
the patch tokens (this project's default), lambda 0.01. Optional (`--arms`): M-MAE (`mmae_cls`: the
coding-rate term `--reg TCR`, mu 3, lambda 0.01, on the class token as M-MAE uses; its training-batch
term value goes to the `train_loss_tcr` column, empty for the other arms). Seeds 0, 1, 2: the same seed
gives the same initialisation, data order and augmentations in every arm, so arms are compared pair
by pair.
Online probe on (evaluated at the end on masked and unmasked val views); effective ranks and
uniformity of 1024 fixed val images at initialisation and at the end; then the cached-feature
linear probe (class token and mean pooling, lr picked on a held-out 10% of the training set) and
20-NN on the final encoder.

Data: `../shared/data/cifar10.tar.gz` (CIFAR-10 as an ImageFolder of JPEGs: the images are
re-encoded, so pixel values differ slightly from the original PNG/pickle release) is unpacked
outside the work tree (`$UMAE_DATA`, default /tmp/umae-data). Run folders live outside the work tree
too (`--out`, default /tmp/umae-runs/cifar10_paired); every step resumes (`--resume auto`), so an
interrupted recipe is simply started again. Each finished run appends one row to the CSV (one row
per arm and seed); with `--commit` the CSV is committed after every run. Columns added since a CSV
was started (`train_loss_tcr`) are appended to its header when the first row that has them is
written; older rows read them as empty.

Baselines (`baselines`, `docs/results/cifar10_paired_baselines.csv`): what the same probes reach
without pre-training. Random initialisation: for each seed, the exact weights the paired runs of
that seed start from (the pre-training model built from the recipe's flags after
`torch.manual_seed(seed)`, as `main_pretrain.py` builds it; tests/test_recipes.py checks it
bitwise), probed by the same `main_linprobe.py` command as a finished run (both pools, lr search,
20-NN). Raw pixels (once): the same eval-transformed images flattened, a logistic regression
(scikit-learn, not the LARS probe) and the same 20-NN (`umae_plugin.baselines`).
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

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("umae_plugin") is None:  # a bare checkout: import it from there
    sys.path.insert(0, str(ROOT))

from umae_plugin.analysis import paired  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"

ARMS = {  # name -> pre-training flags that differ between arms
    "mae": ["--lambda_unif", "0"],
    "umae_cls": ["--lambda_unif", "0.01", "--unif_pool", "cls"],
    "umae_mean": ["--lambda_unif", "0.01", "--unif_pool", "mean"],
    "mmae_cls": ["--lambda_unif", "0.01", "--unif_pool", "cls", "--reg", "TCR", "--uniformity_mu", "3"],
}
DEFAULT_ARMS = ("mae", "umae_cls", "umae_mean")  # mmae_cls on request (--arms)
LABELS = {"mae": ("MAE", "MAE"), "umae_cls": ("U-MAE cls", "cls"), "umae_mean": ("U-MAE mean", "mean"),
          "mmae_cls": ("M-MAE cls", "M-MAE cls")}  # arm -> (table column, short name in differences)
SEEDS = (0,) if SMOKE else (0, 1, 2)

MODEL = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--decoder_embed_dim", "128",
         "--decoder_depth", "2", "--decoder_num_heads", "4", "--norm_pix_loss", "--mask_ratio", "0.75"]
EPOCHS = 4
TRAIN = ["--batch_size", "128", "--weight_decay", "0.05", "--lr", "1e-3", "--warmup_epochs", "1",
         "--epochs", str(EPOCHS)]
if SMOKE:  # digits, a tiny encoder, one epoch: the same code path in seconds
    MODEL = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--embed_dim", "32",
             "--depth", "1", "--num_heads", "2", "--decoder_embed_dim", "16", "--decoder_depth", "1",
             "--decoder_num_heads", "2", "--norm_pix_loss", "--mask_ratio", "0.75"]
    EPOCHS = 1
    TRAIN = ["--batch_size", "128", "--weight_decay", "0.05", "--lr", "1e-3", "--warmup_epochs", "1",
             "--epochs", "1"]

# Columns of the CSV: what each run reports (accuracies in percent).
PRETRAIN_KEYS = [
    "online_probe_masked_acc1", "online_probe_unmasked_acc1",
    "effective_rank_mean", "effective_rank_cls", "effective_rank_centered_mean", "effective_rank_centered_cls",
    "unif_mean", "unif_cls", "train_loss_mae",
]
INIT_KEYS = ["effective_rank_init_mean", "effective_rank_init_cls", "effective_rank_centered_init_mean",
             "effective_rank_centered_init_cls", "unif_init_mean", "unif_init_cls"]
PROBE_KEYS = ["test_acc1_mean", "test_acc1_cls", "knn_acc1_mean", "knn_acc1_cls", "probe_lr"]
TERM_KEYS = ["train_loss_tcr"]  # arm-specific: M-MAE's term (empty for the other arms)
# New columns go at the end: rows appended by an older copy of this recipe stay aligned.
COLUMNS = ["arm", "seed", "epochs", *PRETRAIN_KEYS, *INIT_KEYS, *PROBE_KEYS, "pretrain_s", "probe_s", *TERM_KEYS]
PERCENT = {"online_probe_masked_acc1", "online_probe_unmasked_acc1"}  # fractions in the pre-training log


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


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


WORKERS = "0" if SMOKE else "2"


def data_flags() -> list[str]:
    return ["--dataset", "digits"] if SMOKE else ["--dataset", "imagefolder", "--data_path", str(data_root())]


def probe(checkpoint: Path, pool_flag: str, seed: int, folder: Path) -> float:
    """The probe of every row: cached features of `checkpoint`'s encoder, both pools (`pool_flag`
    only names the headline one), lr searched on held-out training images, 20-NN; seconds taken."""
    return run([sys.executable, "main_linprobe.py", "--model", "vit_tiny_patch16", "--finetune", str(checkpoint),
                "--cache_features", "--lr_search", pool_flag, *data_flags(), "--nb_classes", "10",
                "--epochs", "100", "--warmup_epochs", "10", "--batch_size", "256", "--lr", "1.0",
                "--seed", str(seed), "--device", "cpu", "--num_workers", WORKERS,
                "--output_dir", str(folder), "--log_dir", str(folder), "--resume", "auto"])


def one_run(arm: str, seed: int, out: Path) -> dict:
    folder = out / f"{arm}_seed{seed}"
    pretrain_s = run([sys.executable, "main_pretrain.py", *MODEL, *ARMS[arm], *TRAIN, *data_flags(),
                      "--seed", str(seed), "--device", "cpu", "--num_workers", WORKERS, "--online_probe",
                      "--val-interval", "1000", "--erank_freq", "1000", "--save_freq", "1000", "--print_freq", "50",
                      "--output_dir", str(folder), "--log_dir", str(folder), "--resume", "auto"])
    lines = log_lines(folder)
    row: dict = {"arm": arm, "seed": seed, "epochs": EPOCHS}
    row.update({k: lines[-1].get(k, "") for k in [*PRETRAIN_KEYS, *TERM_KEYS]})
    row.update({k: lines[0].get(k, "") for k in INIT_KEYS})
    for k in PERCENT:
        if row[k] != "":
            row[k] = 100.0 * float(row[k])
    probe_s = probe(folder / "checkpoint-last.pth", "--cls_token" if arm.endswith("_cls") else "--global_pool", seed,
                    folder / "linprobe")
    last = log_lines(folder / "linprobe")[-1]
    row.update({k: last.get(k, "") for k in PROBE_KEYS})
    row.update(pretrain_s=round(pretrain_s), probe_s=round(probe_s))
    return row


def commit(path: Path, message: str) -> None:
    """Commit only `path`, in the repository that holds it (the recipe may run from a frozen copy of the
    code while work goes on in the checkout); a busy index is retried, then left for the next run."""
    where = path.resolve().parent
    for _ in range(5):
        if (subprocess.run(["git", "add", "--", path.name], cwd=where).returncode == 0
                and subprocess.run(["git", "commit", "-q", "-m", message, "--", path.name], cwd=where).returncode == 0):
            return
        time.sleep(10)
    print(f"warning: could not commit {path}; the row is in the file", flush=True)


def cmd_run(args: argparse.Namespace) -> None:
    done = {(r["arm"], int(r["seed"])) for r in read_rows(args.csv)}
    for seed in SEEDS:  # seed-major: each finished seed completes a pair as early as possible
        for arm in args.arms:
            if (arm, seed) in done:
                print(f"skip {arm} seed {seed}: in {args.csv}", flush=True)
                continue
            row = one_run(arm, seed, args.out)
            append_row(args.csv, row)
            print(f"done {arm} seed {seed}: {row}", flush=True)
            if args.commit:
                commit(args.csv, f"docs/results: CIFAR-10 paired run {arm} seed {seed}")


# ---------------------------------------------------------------------------------------------
# baselines: the probes without pre-training

BASELINE_COLUMNS = ["baseline", "seed", "feature", "linear_acc1", "knn_acc1", "probe_lr", "seconds"]


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
    return {"baseline": "raw_pixels", "seed": 0, "feature": "pixels",
            "linear_acc1": 100 * stats["raw_pixels_logreg_acc1"], "knn_acc1": 100 * stats["raw_pixels_knn_acc1"],
            "probe_lr": "", "seconds": round(time.time() - start)}


def cmd_baselines(args: argparse.Namespace) -> None:
    from umae_plugin import checkpoint
    path = baselines_csv(args.csv)
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
            seconds = probe(init, "--global_pool", seed, folder / "linprobe")
            last = log_lines(folder / "linprobe")[-1]
            rows = [{"baseline": kind, "seed": seed, "feature": pool, "linear_acc1": last[f"test_acc1_{pool}"],
                     "knn_acc1": last[f"knn_acc1_{pool}"], "probe_lr": last[f"probe_lr_{pool}"],
                     "seconds": round(seconds)} for pool in ("cls", "mean")]
        for row in rows:
            append_row(path, row, BASELINE_COLUMNS)
        print(f"done {kind} seed {seed}: {rows}", flush=True)
        if args.commit:
            commit(path, f"docs/results: CIFAR-10 paired baseline {kind} seed {seed}")


# ---------------------------------------------------------------------------------------------
# report: paired differences


REPORTED = [("test_acc1_mean", "linear probe, mean pool (%)"), ("test_acc1_cls", "linear probe, class token (%)"),
            ("knn_acc1_mean", "20-NN, mean pool (%)"), ("knn_acc1_cls", "20-NN, class token (%)"),
            ("online_probe_masked_acc1", "online probe, masked views (%)"),
            ("online_probe_unmasked_acc1", "online probe, unmasked views (%)"),
            ("effective_rank_mean", "effective rank, mean pool"), ("effective_rank_cls", "effective rank, class token"),
            ("effective_rank_centered_mean", "centred effective rank, mean pool"),
            ("effective_rank_centered_cls", "centred effective rank, class token"),
            ("unif_mean", "uniformity loss, mean pool"), ("unif_cls", "uniformity loss, class token"),
            ("train_loss_mae", "reconstruction loss (last epoch, train)"),
            ("train_loss_tcr", "TCR term, mu 3 (last epoch, train)")]
PER_SEED = ["test_acc1_mean", "test_acc1_cls", "knn_acc1_mean", "knn_acc1_cls", "online_probe_masked_acc1",
            "online_probe_unmasked_acc1", "effective_rank_mean", "effective_rank_cls", "probe_lr", "train_loss_tcr"]


def cmd_report(args: argparse.Namespace) -> None:
    rows = read_rows(args.csv)
    if not rows:
        sys.exit(f"error: {args.csv}: no runs yet")
    seeds = sorted({int(r["seed"]) for r in rows})
    # the default arms, any other asked for or present; arm-specific measures only when some row has them
    arms = [a for a in ARMS if a in DEFAULT_ARMS or a in args.arms or any(r["arm"] == a for r in rows)]
    others = [a for a in arms if a != "mae"]
    present = {k for r in rows for k, v in r.items() if v not in ("", None)}
    reported = [(k, label) for k, label in REPORTED if k not in TERM_KEYS or k in present]
    per_seed = [k for k in PER_SEED if k not in TERM_KEYS or k in present]

    def digits(key: str) -> int:  # losses and uniformity values sit near 1: three decimals
        return 3 if key.startswith(("unif", "train_loss")) else 2

    def cell(r: dict, key: str) -> str:
        return f"{float(r[key]):.{digits(key)}f}" if r.get(key) not in ("", None) else "-"
    lines = [f"CIFAR-10, ViT-Tiny (32 px, patch 4), {EPOCHS} pre-training epochs, paired seeds {seeds}; "
             f"{len(rows)} of {len(arms) * len(SEEDS)} runs in `{args.csv.name}` (`python recipes/cifar10_paired.py "
             "report`). Linear probes: cached features, lr picked on a held-out 10% of the training set "
             "(`probe_lr`), 100 epochs; accuracies on the 10,000 val images (one accuracy's binomial standard "
             "error is about 0.5 points).", "",
             "Per seed:", "", "| arm | seed | " + " | ".join(per_seed) + " |", "|---|---|" + "---|" * len(per_seed)]
    for r in sorted(rows, key=lambda r: (int(r["seed"]), list(ARMS).index(r["arm"]))):
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(cell(r, k) for k in per_seed) + " |")
    shorts = [LABELS[a][1] for a in others]
    lines += ["", "Per arm: mean over the seeds that arm has finished (per-seed table above). Paired difference: "
              "arm minus MAE on the same seed, mean and 95% t interval over the pairs. Detectable: the true "
              "difference a paired t test at 5% would find with 80% power given the pairs' spread "
              "((t_0.975 + t_0.80) sd / sqrt(n)).", "",
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
    lines += baseline_table(read_rows(baselines_csv(args.csv)))
    out = args.csv.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


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
    features = {"cls": "class token", "mean": "mean pool", "pixels": "pixels"}
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
    p.add_argument("--out", type=Path, default=Path(os.environ.get("UMAE_RUNS", "/tmp/umae-runs/cifar10_paired")),
                   help="run folders (outside the work tree)")
    p.add_argument("--csv", type=Path, default=None,
                   help="one row per arm and seed (default: docs/results/cifar10_paired.csv; <out>/smoke.csv with SMOKE=1)")
    p.add_argument("--commit", action="store_true", help="git-commit the CSV after every finished run (or baseline)")
    p.add_argument("--arms", type=arm_list, default=list(DEFAULT_ARMS), metavar="ARM,ARM,...",
                   help=f"arms to run, in this order (known: {', '.join(ARMS)}); the report adds any arm in the CSV")
    args = p.parse_args()
    if args.csv is None:
        args.csv = args.out / "smoke.csv" if SMOKE else ROOT / "docs" / "results" / "cifar10_paired.csv"
    {"run": cmd_run, "baselines": cmd_baselines, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
