"""MAE vs U-MAE on the embedded `digits` data, end to end on a CPU in a few minutes.

    python -m umae_plugin.quickstart [--output_dir quickstart] [--epochs 20]
    umae-quickstart [--output_dir quickstart] [--epochs 20]        (the same, installed)

Pre-trains a small ViT (128-d, 4 blocks, 32 px, patch 4, 64-d 1-block decoder) twice with the
same seed and budget, once as MAE (lambda 0) and once as U-MAE (lambda 0.01), through
`umae_plugin.pretrain.main` (what `main_pretrain.py` runs); then probes both on cached features
(linear head with LARS, and k-NN), and prints a side-by-side table. Writes both models' normalised
singular-value spectra (paper Fig. 1b) to `<output_dir>/spectra.png` and the table to
`<output_dir>/summary.{md,json}`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import data
from .checkpoint import load_model
from .errors import exit_on_error
from .baselines import raw_pixel_baselines
from .linprobe_cached import extract_features, knn_votes, train_linear_head
from .metrics import effective_rank, singular_spectrum
from .pretrain import get_args_parser as pretrain_parser
from .pretrain import main as pretrain_main
from .runtime import resolve_device

SMALL_VIT = ["--model", "mae_vit_tiny_patch16", "--embed_dim", "128", "--depth", "4", "--num_heads", "4",
             "--decoder_embed_dim", "64", "--decoder_depth", "1", "--decoder_num_heads", "4",
             "--input_size", "32", "--patch_size", "4", "--dataset", "digits"]


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="quickstart")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lambda_unif", type=float, default=0.01)
    p.add_argument("--probe_epochs", type=int, default=100)
    p.add_argument("--probe_lr", type=float, default=4.0,
                   help="LARS lr of the cached-feature probe: digits gives ~6 steps an epoch, so the "
                        "upstream 0.1 per 256 images under-trains the head badly")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def pretrain(out: Path, lambda_unif: float, args: argparse.Namespace) -> tuple[dict, float]:
    argv = SMALL_VIT + [
        "--lambda_unif", str(lambda_unif), "--epochs", str(args.epochs), "--warmup_epochs", "3",
        "--batch_size", "64", "--blr", "1e-3", "--weight_decay", "0.05", "--device", args.device,
        "--seed", str(args.seed), "--num_workers", "0", "--output_dir", str(out), "--log_dir", str(out),
        "--print_freq", "1000", "--save_freq", "1000", "--online_probe", "--resume", "auto",
    ]
    start = time.time()
    stats = pretrain_main(pretrain_parser().parse_args(argv))
    return stats, time.time() - start


@torch.no_grad()
def probe(out: Path, device: torch.device, probe_epochs: int, probe_lr: float) -> dict[str, float]:
    model = load_model(out / "checkpoint-last.pth", device)  # rebuilt from the file alone, eval mode
    feats = {}
    for split in ("train", "val"):
        ds = data.build_dataset("digits", None, split, data.eval_transform(32))
        loader = data.build_loader(ds, 256, train=False, num_workers=0, pin_memory=False)
        feats[split] = extract_features(model, loader, device)
    (tr, ytr), (va, yva) = feats["train"], feats["val"]
    head = nn.Sequential(nn.BatchNorm1d(tr.shape[1], affine=False, eps=1e-6), nn.Linear(tr.shape[1], 10)).to(device)
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    with torch.enable_grad():
        train_linear_head(head, tr, ytr, epochs=probe_epochs, batch_size=256, lr=probe_lr,
                          warmup_epochs=10, val_feats=va, val_labels=yva)
    head.eval()
    linear_right = (head(va).argmax(dim=1) == yva).cpu()
    knn_right = (knn_votes(tr, ytr, va, k=20, num_classes=10).argmax(dim=1) == yva).cpu()
    return {"linear_acc1": linear_right.float().mean().item(), "knn_acc1": knn_right.float().mean().item(),
            "linear_right": linear_right, "knn_right": knn_right, "erank_val": effective_rank(va),
            "spectrum": (singular_spectrum(va) / singular_spectrum(va)[0]).tolist()}


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy `p` measured on `n` images."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def paired_difference(a_right: torch.Tensor, b_right: torch.Tensor) -> tuple[float, float, int, int]:
    """Accuracy of b minus a on the same images, its standard error from McNemar's discordant
    counts (only images one model gets right and the other wrong carry the difference), and the
    counts themselves (a right / b wrong, b right / a wrong)."""
    n = len(a_right)
    only_a = int((a_right & ~b_right).sum())
    only_b = int((b_right & ~a_right).sum())
    diff = (only_b - only_a) / n
    se = math.sqrt(max(only_a + only_b - (only_b - only_a) ** 2 / n, 0.0)) / n
    return diff, se, only_a, only_b


def plot_spectra(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    for name, r in results.items():
        ax.plot(range(1, len(r["spectrum"]) + 1), r["spectrum"], label=f"{name} (erank {r['erank_val']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalised singular value")
    ax.set_title("digits val features")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = get_args()
    out = Path(args.output_dir)
    device = resolve_device(args.device)  # DeviceError up front, before any pre-training; no CPU fallback
    evaluation = data.eval_transform(32)
    train_set, val_set = (data.build_dataset("digits", None, split, evaluation) for split in ("train", "val"))
    pixels = raw_pixel_baselines(train_set, val_set, num_classes=10, seed=args.seed)
    n_val = len(val_set)
    results = {}
    for name, lam in (("MAE", 0.0), ("U-MAE", args.lambda_unif)):
        stats, wall = pretrain(out / name.lower().replace("-", ""), lam, args)
        results[name] = {**probe(out / name.lower().replace("-", ""), device, args.probe_epochs, args.probe_lr),
                         "lambda_unif": lam, "loss_mae": stats["train_loss_mae"],
                         "loss_unif": stats.get("train_loss_unif", float("nan")),
                         "erank_train_log": stats["effective_rank_mean"],
                         "online_probe_masked_acc1": stats.get("online_probe_masked_acc1", float("nan")),
                         "online_probe_unmasked_acc1": stats.get("online_probe_unmasked_acc1", float("nan")),
                         "wall_time_s": wall}
    nan = float("nan")
    baseline = {"linear_acc1": pixels["raw_pixels_logreg_acc1"], "knn_acc1": pixels["raw_pixels_knn_acc1"]}
    rows = [("lambda_unif", "{:g}"), ("loss_mae", "{:.4f}"), ("loss_unif", "{:.4f}"), ("erank_val", "{:.2f}"),
            ("linear_acc1", None), ("knn_acc1", None), ("online_probe_masked_acc1", None),
            ("online_probe_unmasked_acc1", None), ("wall_time_s", "{:.0f}")]

    def cell(value: float, fmt: str | None) -> str:
        if value != value:  # NaN: the term is off, or no such baseline
            return "-"
        if fmt is None:  # an accuracy on the val images, with its binomial standard error
            return f"{value:.2%} ± {standard_error(value, n_val):.2%}"
        return fmt.format(value)

    lines = ["| metric | MAE | U-MAE | raw pixels |", "|---|---|---|---|"]
    lines += [f"| {k} | {cell(results['MAE'][k], fmt)} | {cell(results['U-MAE'][k], fmt)} | "
              f"{cell(baseline.get(k, nan), fmt)} |" for k, fmt in rows]
    table = "\n".join(lines)
    verdicts = []
    for key, label in (("linear_right", "linear probe"), ("knn_right", "20-NN")):
        diff, se, only_mae, only_umae = paired_difference(results["MAE"][key], results["U-MAE"][key])
        verdict = "exceeds" if abs(diff) > 2 * se else "is within"
        verdicts.append(f"{label} {diff * 100:+.1f} points (SE {se * 100:.1f}; {only_mae} images only MAE gets "
                        f"right, {only_umae} only U-MAE) {verdict} two standard errors")
    paired_line = (f"U-MAE minus MAE on the same {n_val} val images (McNemar): " + "; ".join(verdicts) + ".")
    print(f"\ndigits, {args.epochs} pre-training epochs each (erank: effective rank of the val features; "
          f"accuracies ± binomial standard error over {n_val} val images; raw pixels: logistic regression and "
          "20-NN on the same images)\n")
    print(table)
    print("\n" + paired_line)
    table += "\n\n" + paired_line
    (out / "summary.md").write_text(table + "\n")
    summary = {k: {kk: vv for kk, vv in v.items() if kk not in ("spectrum", "linear_right", "knn_right")}
               for k, v in results.items()}
    summary["raw pixels"] = pixels
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_spectra(results, out / "spectra.png")
    print(f"\nspectra: {out / 'spectra.png'}")


def entry() -> None:
    """`umae-quickstart` and `python -m umae_plugin.quickstart`."""
    exit_on_error(main)  # a UserError (DeviceError, DataError, ...) or OSError: one line `error: ...`


if __name__ == "__main__":
    entry()
