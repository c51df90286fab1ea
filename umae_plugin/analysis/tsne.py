"""t-SNE of features, checkpoints side by side (paper Fig. 3a).

    python -m umae_plugin.analysis tsne --checkpoints mae/checkpoint-399.pth umae/checkpoint-399.pth \
        --labels MAE U-MAE --dataset imagefolder --data_path /imagenet --num_classes 10 --per_class 100

The same `--num_classes` random classes x `--per_class` random images (seeded) for every
checkpoint; pooled features of the unmasked images, L2-normalised (as the paper's collapse
analysis; `--no_l2` keeps them raw), embedded by scikit-learn's `TSNE` (PCA initialisation,
`random_state=--seed`), coloured by class. One `--panel_px` square panel per checkpoint in
`tsne.png`; coordinates in `tsne.csv`; the KL divergence of each embedding and the cosine
silhouette score of the features (a number for how separated the classes are) in `tsne.json`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch.nn.functional as nnf

from . import features as F
from . import report

log = logging.getLogger("umae")


def embed(feats: np.ndarray, *, seed: int = 0, perplexity: float = 30.0, max_iter: int = 1000) -> tuple[np.ndarray, float]:
    """2-D t-SNE coordinates [n, 2] and the final KL divergence; the perplexity is capped below
    the number of samples (scikit-learn requires perplexity < n)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    n = len(feats)
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed,
                max_iter=max_iter)
    # Small problems run faster on one thread: OpenMP workers spinning beside torch's own pool
    # (on a busy machine) cost more than they save.
    with threadpool_limits(limits=1 if n <= 2000 else None):
        coords = tsne.fit_transform(np.asarray(feats, dtype=np.float64))
    return coords, float(tsne.kl_divergence_)


def silhouette(feats: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean cosine silhouette of the classes in feature space (None for fewer than 2 classes)."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return None
    return float(silhouette_score(feats, labels, metric="cosine"))


def plot_panels(panels: Sequence[dict[str, Any]], labels: np.ndarray, class_names: Sequence[str],
                path: str | Path, panel_px: int = 480, title: str = "") -> Path:
    """One square scatter panel per entry of `panels` ({"label", "coords"}), `panel_px` each, under
    `title` (what the data and features are)."""
    fig = report.new_figure(panel_px * len(panels), panel_px + (40 if title else 0))
    classes = np.unique(labels)
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    from matplotlib import colormaps

    colours = colormaps[cmap].resampled(max(len(classes), 2))
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        coords = np.asarray(panel["coords"])
        for i, c in enumerate(classes):
            sel = labels == c
            name = class_names[c] if c < len(class_names) else str(c)
            ax.scatter(coords[sel, 0], coords[sel, 1], s=6, color=colours(i), label=name)
        panel_title = panel["label"]
        if panel.get("training_seed") is not None:
            panel_title += f" (training seed {panel['training_seed']})"
        if panel.get("silhouette") is not None:
            panel_title += f"\n(cosine silhouette of the features, not of this embedding: {panel['silhouette']:.3f})"
        ax.set_title(panel_title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        fig.axes[-1].legend(fontsize=6, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                            borderaxespad=0.0)  # beside the points, never over them
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return report.save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tsne: t-SNE of features, checkpoints side by side", add_help=False)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--labels", nargs="*", default=None, help="one label per checkpoint")
    parser.add_argument("--num_classes", default=10, type=int, help="random classes (0: all)")
    parser.add_argument("--per_class", default=50, type=int, help="random images per class")
    parser.add_argument("--perplexity", default=30.0, type=float)
    parser.add_argument("--max_iter", default=1000, type=int, help="t-SNE iterations (scikit-learn: at least 250)")
    parser.add_argument("--no_l2", action="store_true", help="embed raw features instead of L2-normalised ones")
    parser.add_argument("--panel_px", default=480, type=int, help="size of each square panel in pixels")
    F.add_data_args(parser)
    F.add_model_args(parser)
    F.add_runtime_args(parser, "analysis_out/tsne")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    labels_given = args.labels or [f"{Path(p).parent.name}/{Path(p).stem}" for p in args.checkpoints]
    if len(labels_given) != len(args.checkpoints):
        raise SystemExit(f"error: {len(labels_given)} labels for {len(args.checkpoints)} checkpoints")
    device = F.device_from(args.device)  # DeviceError before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    indices = class_labels = None
    panels = []
    for label, path, lm, ds in F.models_with_data(args, labels_given, device):
        if indices is None:
            indices = F.per_class_indices(F.targets_of(ds), args.num_classes, args.per_class, args.seed)
        feats, class_labels_t = F.extract_features(lm.model, ds, indices, device=device, batch_size=args.batch_size,
                                                   num_workers=args.num_workers, pool=args.pool)
        class_labels = class_labels_t.numpy()
        if not args.no_l2:
            feats = nnf.normalize(feats, dim=1)
        feats_np = feats.double().numpy()
        log.info("%s: t-SNE of %d features (dim %d)", label, *feats_np.shape)
        coords, kl = embed(feats_np, seed=args.seed, perplexity=args.perplexity, max_iter=args.max_iter)
        seed = (lm.args or {}).get("seed")  # the training run's seed, when the checkpoint stores its args
        panels.append({"label": label, "checkpoint": str(path), "coords": coords, "kl_divergence": kl,
                       "silhouette": silhouette(feats_np, class_labels), "training_seed": seed})
    class_names = list(getattr(ds, "classes", [])) or [str(c) for c in range(int(class_labels.max()) + 1)]
    pooled = f"{args.pool}-pooled" if args.pool else "each model's own pooled"
    title = (f"t-SNE of {len(class_labels)} {F.data_name(args.dataset, args.data_path, args.split)} images "
             f"({len(np.unique(class_labels))} classes; image sample and t-SNE seed {args.seed}), "
             f"{'raw' if args.no_l2 else 'L2-normalised'} {pooled} encoder features")
    plot_panels(panels, class_labels, class_names, out / "tsne.png", args.panel_px, title=title)
    rows = [{"label": p["label"], "index": int(i), "class": int(c), "x": float(x), "y": float(y)}
            for p in panels for i, c, (x, y) in zip(indices, class_labels, p["coords"])]
    report.write_csv(out / "tsne.csv", rows, ["label", "index", "class", "x", "y"])
    result = {
        "panels": [{k: v for k, v in p.items() if k != "coords"} for p in panels],
        "indices": [int(i) for i in indices],
        "classes": [int(c) for c in class_labels],
        "coords": {p["label"]: np.asarray(p["coords"]).tolist() for p in panels},
        "settings": {"dataset": args.dataset, "split": args.split, "seed": args.seed,
                     "perplexity": args.perplexity, "max_iter": args.max_iter, "l2_normalised": not args.no_l2,
                     "pool": args.pool, "title": title},
    }
    report.write_json(out / "tsne.json", result)
    for p in result["panels"]:
        sil = "-" if p["silhouette"] is None else f"{p['silhouette']:.4f}"
        print(f"{p['label']}: KL {p['kl_divergence']:.4f}, cosine silhouette of features {sil}")
    print(f"wrote {out}")
    return result
