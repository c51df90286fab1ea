"""Dimensional collapse (paper Fig. 1b-c, appendix B.1): effective rank and singular-value
spectra of L2-normalised features, and effective rank over training epochs.

    python -m umae_plugin.analysis collapse --checkpoints mae/checkpoint-399.pth umae/checkpoint-399.pth \
        --labels MAE U-MAE --dataset imagefolder --data_path /imagenet --output_dir out/collapse
    python -m umae_plugin.analysis collapse --runs out/mae out/umae --labels MAE U-MAE

With `--checkpoints`: features of the same `--num_samples` (paper: 100) seeded images of the
`--split`, `effective_rank` (metrics.effective_rank) of each, and the singular values of the
row-normalised feature matrix divided by the largest, all checkpoints on one log-scale figure
(`spectra.png`, numbers in `collapse.json` and `collapse.csv`, with the centred rank and the
U-MAE / M-MAE terms of the same features: `unif`, `tcr` at `--tcr_mu`). With `--runs`: the effective rank
each training run logged in its `log.txt` (JSON lines with `epoch`) for the `--pool` (default
`mean`: key `effective_rank_mean`; `cls`: `effective_rank_cls`), plotted over epochs
(`erank_over_epochs.png`, `erank_over_epochs.csv`).
"""
from __future__ import annotations

import argparse
import json
import textwrap
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import checkpoint, losses, metrics
from ..logger import read_log
from . import features as F
from . import report

log = logging.getLogger("umae")


# ---------------------------------------------------------------------------------------------
# numbers


def collapse_stats(feats: torch.Tensor, tcr_mu: float = 3.0) -> dict[str, Any]:
    """Effective rank (uncentred, the paper's; and centred) and singular values of L2-normalised
    `feats` [n, D]; `spectrum` is the singular values divided by the largest (the paper's
    normalised spectrum). Also the two uniformity terms on the same features, ungathered: U-MAE's
    mean squared cosine (`unif`, `losses.uniformity_loss`) and M-MAE's coding-rate loss
    (`tcr`, `losses.coding_rate_loss` with `mu=tcr_mu`, uncentred; lower: more spread)."""
    s = metrics.singular_spectrum(feats)
    return {
        "effective_rank": metrics.effective_rank(feats),
        "effective_rank_centered": metrics.effective_rank_centered(feats),
        "unif": float(losses.uniformity_loss(feats, gather=False)),
        "tcr": float(losses.coding_rate_loss(feats, mu=tcr_mu, gather=False)),
        "tcr_mu": float(tcr_mu),
        "singular_values": s.tolist(),
        "spectrum": (s / s[0]).tolist() if s[0] > 0 else s.tolist(),
        "num_samples": int(feats.shape[0]),
        "feature_dim": int(feats.shape[1]),
    }


def erank_over_epochs(run_dir: str | Path, key: str = "effective_rank_mean") -> tuple[list[int], list[float]]:
    """(epochs, effective ranks) from a run's `log.txt`, epochs ascending; a repeated epoch (a
    resumed run) keeps its last line; lines without `key` (`effective_rank_mean`: the uncentred
    effective rank of the mean-pooled features; `effective_rank_cls`, `effective_rank_centered_*`)
    are skipped."""
    by_epoch: dict[int, float] = {}
    for row in read_log(Path(run_dir) / "log.txt"):
        if "epoch" in row and row.get(key) is not None:
            by_epoch[int(row["epoch"])] = float(row[key])
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


# ---------------------------------------------------------------------------------------------
# figures


def plot_spectra(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    fig = report.new_figure(640, 480)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        spec = np.asarray(r["spectrum"])
        spec = np.where(spec > 0, spec, np.nan)  # log scale: zeros are not drawn
        ax.plot(np.arange(1, len(spec) + 1), spec, label=f"{r['label']} (erank {r['effective_rank']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value / largest")
    ax.set_title(textwrap.fill(title or "normalised singular-value spectrum of L2-normalised features", 70),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return report.save_figure(fig, path)


def _logged_data(runs: Sequence[str]) -> list[str]:
    """The data each run measured its ranks on, from its `args.json` ("cifar10 val"), without repeats."""
    names = []
    for run in runs:
        try:
            a = json.loads((Path(run) / "args.json").read_text())
            name = F.data_name(a.get("dataset", "imagefolder"), a.get("data_path"), "val")
        except (OSError, ValueError, AttributeError):
            name = "the val images"
        if name not in names:
            names.append(name)
    return names


def plot_erank_curves(curves: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    fig = report.new_figure(640, 480)
    ax = fig.add_subplot(1, 1, 1)
    for c in curves:
        ax.plot(c["epochs"], c["effective_rank"], marker="o" if len(c["epochs"]) < 30 else None,
                markersize=3, label=c["label"])
    ax.set_xlabel("epoch (counted from 0; measured at its end)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("effective rank")
    ax.set_title(textwrap.fill(title or "effective rank over training (logged)", 80), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return report.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("collapse: effective rank and singular-value spectra", add_help=False)
    parser.add_argument("--checkpoints", nargs="*", default=[], help="checkpoints to compare")
    parser.add_argument("--runs", nargs="*", default=[], help="training output folders with a log.txt")
    parser.add_argument("--labels", nargs="*", default=None,
                        help="one label per checkpoint (or per run when only --runs is given)")
    parser.add_argument("--run_labels", nargs="*", default=None, help="labels of --runs (default: folder names)")
    parser.add_argument("--num_samples", default=100, type=int, help="images for the effective rank (paper: 100; 0: all)")
    parser.add_argument("--tcr_mu", default=3.0, type=float,
                        help="mu of the coding-rate value reported beside the rank (M-MAE's term; default 3)")
    parser.add_argument("--random_init", action="store_true",
                        help="add the first checkpoint's architecture freshly initialised (seeded by --seed) as a "
                             "baseline curve, as the paper's Fig. 1b")
    F.add_data_args(parser)
    F.add_model_args(parser)
    F.add_runtime_args(parser, "analysis_out/collapse")
    return parser


def _labels(given: Sequence[str] | None, defaults: Sequence[str], what: str) -> list[str]:
    if not given:
        return list(defaults)
    if len(given) != len(defaults):
        raise SystemExit(f"error: {len(given)} labels for {len(defaults)} {what}")
    return list(given)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not args.checkpoints and not args.runs:
        raise SystemExit("error: give --checkpoints and / or --runs")
    device = F.device_from(args.device) if args.checkpoints else None  # DeviceError before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}

    if args.checkpoints:
        labels = _labels(args.labels, [f"{Path(p).parent.name}/{Path(p).stem}" for p in args.checkpoints], "checkpoints")
        indices = None
        entries = []
        for label, path, lm, ds in F.models_with_data(args, labels, device):
            if indices is None:  # the same images for every checkpoint
                indices = F.random_indices(len(ds), args.num_samples, args.seed)
            feats, _ = F.extract_features(lm.model, ds, indices, device=device, batch_size=args.batch_size,
                                          num_workers=args.num_workers, pool=args.pool)
            stats = collapse_stats(feats, args.tcr_mu)
            log.info("%s: effective rank %.2f of %d features (dim %d)", label, stats["effective_rank"],
                     stats["num_samples"], stats["feature_dim"])
            entries.append({"label": label, "checkpoint": str(path), "model": lm.name, **stats})
            if args.random_init and len(entries) == 1:
                baseline = (lm, ds)
        if args.random_init:
            lm, ds = baseline
            record = {**lm.model_args, "kwargs": {**lm.model_args["kwargs"], "img_size": lm.input_size}}
            torch.manual_seed(args.seed)
            model = checkpoint.build_model(record).to(device).eval()
            feats, _ = F.extract_features(model, ds, indices, device=device, batch_size=args.batch_size,
                                          num_workers=args.num_workers, pool=args.pool)
            stats = collapse_stats(feats, args.tcr_mu)
            label = f"random init (seed {args.seed})"
            log.info("%s: effective rank %.2f", label, stats["effective_rank"])
            entries.append({"label": label, "checkpoint": "", "model": lm.name, **stats})
        plot_spectra(entries, out / "spectra.png",
                     f"{F.data_name(args.dataset, args.data_path, args.split)}, {entries[0]['num_samples']} images "
                     f"(seed {args.seed}), {args.pool or 'the model'}-pooled features")
        report.write_csv(out / "collapse.csv", entries, ["label", "effective_rank", "effective_rank_centered", "unif", "tcr", "tcr_mu",
                                                          "num_samples", "feature_dim", "checkpoint"])
        result["checkpoints"] = entries
        result["sample"] = {"dataset": args.dataset, "split": args.split, "seed": args.seed,
                            "indices": [int(i) for i in indices]}

    if args.runs:
        run_labels = args.run_labels or (args.labels if not args.checkpoints else None)
        run_labels = _labels(run_labels, [Path(r).resolve().name for r in args.runs], "runs")
        curves = []
        key = f"effective_rank_{args.pool or 'mean'}"
        for label, run in zip(run_labels, args.runs):
            epochs, eranks = erank_over_epochs(run, key)
            if not epochs:
                log.warning("%s: no %s in %s", label, key, Path(run) / "log.txt")
            curves.append({"label": label, "run": str(run), "epochs": epochs, "effective_rank": eranks})
        runs = ", ".join(f"{c['label']}: {Path(c['run']).resolve().name}" for c in curves)
        plot_erank_curves(curves, out / "erank_over_epochs.png",
                          f"{key} of {' / '.join(_logged_data(args.runs))} as each run logged (runs {runs})")
        rows = [{"label": c["label"], "epoch": e, "effective_rank": r}
                for c in curves for e, r in zip(c["epochs"], c["effective_rank"])]
        report.write_csv(out / "erank_over_epochs.csv", rows, ["label", "epoch", "effective_rank"])
        result["runs"] = curves

    report.write_json(out / "collapse.json", result)
    for e in result.get("checkpoints", []):
        print(f"{e['label']}: effective rank {e['effective_rank']:.3f} (centred {e['effective_rank_centered']:.3f}), "
              f"unif {e['unif']:.4f}, tcr(mu {e['tcr_mu']:g}) {e['tcr']:.3f} ({e['num_samples']} samples, "
              f"dim {e['feature_dim']})")
    for c in result.get("runs", []):
        last = f"{c['effective_rank'][-1]:.3f} at epoch {c['epochs'][-1]}" if c["epochs"] else "none logged"
        print(f"{c['label']}: last logged effective rank {last}")
    print(f"wrote {out}")
    return result
