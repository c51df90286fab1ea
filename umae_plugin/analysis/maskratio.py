"""Mask ratio and class separation in pixel space (paper Sec. 4.2, Fig. 2b-c, appendix B.2).

    python -m umae_plugin.analysis maskratio --dataset imagefolder --data_path /imagenet \
        --num_classes 10 --per_class 10 --input_size 224 --patch_size 16 --output_dir out/maskratio
    python -m umae_plugin.analysis maskratio --dataset digits --input_size 32 --patch_size 4

The paper's argument: masking connects images of one class through their shared visible parts,
so a good mask ratio makes masked images of one class close relative to images of other classes.
Measured here, with no model:

* images: `--num_classes` random classes x `--per_class` random images (seeded) of the `--split`,
  resized and center-cropped to `--input_size` (the evaluation transform); `--pixels normalized`
  (default) uses the ImageNet-normalised pixels the model sees, `--pixels raw` the [0, 1] RGB
  values of the same crop;
* patches: non-overlapping `--patch_size` squares, each flattened to a p*p*C vector (row-major
  patch grid, channels last, as `MaskedAutoencoderViT.patchify`);
* masks: every image is masked independently, uniformly at random, keeping
  `max(1, int(L * (1 - ratio)))` of its L patches (the model's rule); `--draws` independent draws
  per ratio from a generator seeded with `--seed`;
* distance of two masked images: over all pairs (a visible patch of one, a visible patch of the
  other), the l2 distances of the patch vectors, reduced by `--reduce max` (appendix B.2, the
  default) or `--reduce mean` (Sec. 4.2);
* intra-class distance: the mean over pairs of distinct images of one class; inter-class: over
  pairs of images of different classes; both averaged over the draws (the table also gives the
  standard deviation over draws). The reported ratio is intra / inter: lower means better
  separated classes (the paper finds its minimum near a mask ratio of 0.7).

Patch-to-patch distances do not depend on the masks, so they are computed once per block of
images (`torch.cdist`) and every mask draw of every ratio only reduces them.
Writes `maskratio.csv`, `maskratio.md`, `maskratio.json` and `maskratio.png`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..models_mae import patchify
from . import features as F
from . import report

log = logging.getLogger("umae")

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COLUMNS = ("mask_ratio", "visible_patches", "intra", "inter", "intra_inter_ratio", "intra_std", "inter_std",
           "ratio_std")


def random_visible(num_draws: int, num_images: int, num_patches: int, ratio: float,
                   generator: torch.Generator) -> torch.Tensor:
    """[num_draws, num_images, L] bool, True where visible: each row keeps
    `max(1, int(L * (1 - ratio)))` patches chosen uniformly at random."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    keep = max(1, int(num_patches * (1 - ratio)))
    noise = torch.rand(num_draws, num_images, num_patches, generator=generator)
    visible = torch.zeros(num_draws, num_images, num_patches, dtype=torch.bool)
    return visible.scatter_(-1, noise.argsort(dim=-1)[..., :keep], True)


def _reduce_block(dist: torch.Tensor, vis_i: torch.Tensor, vis_j: torch.Tensor, reduce: str) -> torch.Tensor:
    """dist [c, L, N, L] (patch a of image i, patch b of image j), visible masks vis_i [c, L],
    vis_j [N, L] -> [c, N] reduced over visible (a, b) pairs."""
    if reduce == "mean":
        w_i, w_j = vis_i.to(dist.dtype), vis_j.to(dist.dtype)
        total = torch.einsum("ca,canb,nb->cn", w_i, dist, w_j)
        return total / (w_i.sum(1)[:, None] * w_j.sum(1)[None, :])
    counts_i, counts_j = vis_i.sum(1), vis_j.sum(1)
    if bool((counts_i == counts_i[0]).all()) and bool((counts_j == counts_i[0]).all()):
        # Same number k of visible patches everywhere (random masks): gather the k x k block.
        k = int(counts_i[0])
        c, length, n, _ = dist.shape
        idx_i = vis_i.float().argsort(dim=1, descending=True, stable=True)[:, :k]  # [c, k]
        idx_j = vis_j.float().argsort(dim=1, descending=True, stable=True)[:, :k]  # [N, k]
        sub = dist.gather(1, idx_i[:, :, None, None].expand(c, k, n, length))
        sub = sub.gather(3, idx_j[None, None].expand(c, k, n, k))
        return sub.amax(dim=(1, 3))
    neg = torch.finfo(dist.dtype).min
    x = dist.masked_fill(~vis_j[None, None], neg).amax(dim=-1)  # [c, L, N]
    return x.masked_fill(~vis_i[:, :, None], neg).amax(dim=1)


def masked_image_distances(
    patches: torch.Tensor, visible: torch.Tensor, reduce: str = "max", max_block_elems: int = 1 << 25
) -> torch.Tensor:
    """Distances between masked images for each of K maskings.

    patches [N, L, d]; visible [K, N, L] bool (True: visible; at least one per image) ->
    [K, N, N]: entry (k, i, j) is the max (or mean) over visible patches a of image i and b of
    image j, under masking k, of ||patches[i, a] - patches[j, b]||_2.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    n, length, d = patches.shape
    visible = visible.to(patches.device)
    if visible.ndim != 3 or visible.shape[1:] != (n, length):
        raise ValueError(f"visible must be [K, {n}, {length}], got {tuple(visible.shape)}")
    if not bool(visible.any(-1).all()):
        raise ValueError("every image needs at least one visible patch")
    out = patches.new_empty(visible.shape[0], n, n)
    flat = patches.reshape(n * length, d)
    block = max(1, min(n, max_block_elems // (length * n * length)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        # The distance is symmetric: pair block [start, stop) with images [start, N) only.
        dist = torch.cdist(patches[start:stop].reshape(-1, d), flat[start * length:])
        dist = dist.view(stop - start, length, n - start, length)
        for k in range(visible.shape[0]):
            part = _reduce_block(dist, visible[k, start:stop], visible[k, start:], reduce)  # [c, N - start]
            out[k, start:stop, start:] = part
            out[k, start:, start:stop] = part.T
        if n > block:
            log.info("distances: images %d-%d of %d done", start, stop, n)
    return out


def class_means(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dist [..., N, N], labels [N] -> (intra, inter) [...]: mean over pairs i < j of the same /
    of different labels."""
    labels = labels.to(dist.device)
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool, device=dist.device).triu(1)
    same = labels[:, None] == labels[None, :]
    intra_pairs, inter_pairs = upper & same, upper & ~same
    if not intra_pairs.any() or not inter_pairs.any():
        raise ValueError("need at least two images of one class and two classes")
    intra = dist[..., intra_pairs].mean(-1)
    inter = dist[..., inter_pairs].mean(-1)
    return intra, inter


def mask_ratio_table(
    patches: torch.Tensor,
    labels: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    draws: int = 5,
    reduce: str = "max",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per ratio (see `COLUMNS`) for patches [N, L, d] of images with `labels`."""
    g = torch.Generator().manual_seed(seed)
    n, length, _ = patches.shape
    visible = torch.cat([random_visible(draws, n, length, r, g) for r in ratios])  # [R * draws, N, L]
    intra, inter = class_means(masked_image_distances(patches, visible, reduce), labels)
    intra, inter = intra.view(len(ratios), draws).double().cpu(), inter.view(len(ratios), draws).double().cpu()
    rows = []
    for i, r in enumerate(ratios):
        per_draw = intra[i] / inter[i]
        rows.append({
            "mask_ratio": float(r),
            "visible_patches": max(1, int(length * (1 - r))),
            "intra": intra[i].mean().item(),
            "inter": inter[i].mean().item(),
            "intra_inter_ratio": (intra[i].mean() / inter[i].mean()).item(),
            "intra_std": intra[i].std().item() if draws > 1 else 0.0,
            "inter_std": inter[i].std().item() if draws > 1 else 0.0,
            "ratio_std": per_draw.std().item() if draws > 1 else 0.0,
        })
    return rows


def plot_table(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    r = np.array([row["mask_ratio"] for row in rows])
    fig = report.new_figure(1000, 420)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, colour in (("intra", "tab:blue"), ("inter", "tab:orange")):
        mean = np.array([row[key] for row in rows])
        std = np.array([row[f"{key}_std"] for row in rows])
        ax1.plot(r, mean, marker="o", color=colour, label=f"{key}-class")
        ax1.fill_between(r, mean - std, mean + std, color=colour, alpha=0.2)
    ax1.set_xlabel("mask ratio")
    ax1.set_ylabel("distance between masked images")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    ratio = np.array([row["intra_inter_ratio"] for row in rows])
    spread = np.array([row.get("ratio_std", 0.0) for row in rows])
    ax2.errorbar(r, ratio, yerr=spread, marker="o", color="tab:green", capsize=3, label="mean +- std over draws")
    best = int(ratio.argmin())
    others = np.delete(ratio - spread, best)
    if others.size and ratio[best] + spread[best] < others.min():  # a minimum the error bars separate
        ax2.plot([r[best]], [ratio[best]], marker="*", markersize=14, color="tab:red", label=f"lowest at {r[best]:g}")
    ax2.set_xlabel("mask ratio")
    ax2.set_ylabel("intra / inter")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return report.save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("maskratio: intra- / inter-class distance of masked images", add_help=False)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--num_classes", default=10, type=int, help="random classes (0: all)")
    parser.add_argument("--per_class", default=10, type=int, help="random images per class")
    parser.add_argument("--draws", default=5, type=int, help="independent mask draws per ratio")
    parser.add_argument("--reduce", default="max", choices=["max", "mean"],
                        help="over visible patch pairs: max (appendix B.2) or mean (Sec. 4.2)")
    parser.add_argument("--pixels", default="normalized", choices=["normalized", "raw"],
                        help="ImageNet-normalised pixels (what the model sees) or raw [0, 1] RGB")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    F.add_data_args(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="analysis_out/maskratio")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.draws < 1:
        raise SystemExit("error: --draws must be >= 1")
    device = F.device_from(args.device)  # DeviceError before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = F.build_eval_dataset(args.dataset, args.data_path, args.split, args.input_size)
    indices = F.per_class_indices(F.targets_of(ds), args.num_classes, args.per_class, args.seed)
    imgs, labels = F.stack_images(ds, indices)
    if args.pixels == "raw":
        imgs = imgs * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    patches = patchify(imgs, args.patch_size).to(device)
    log.info("maskratio: %d images of %d classes, %d patches of dim %d, %d ratios x %d draws on %s",
             len(indices), len(labels.unique()), patches.shape[1], patches.shape[2], len(args.ratios),
             args.draws, device)
    rows = mask_ratio_table(patches, labels, args.ratios, draws=args.draws, reduce=args.reduce, seed=args.seed)
    best = min(rows, key=lambda row: row["intra_inter_ratio"])
    title = (f"{F.data_name(args.dataset, args.data_path, args.split)}: {len(labels.unique())} classes x {args.per_class} images, "
             f"{args.input_size}px / patch {args.patch_size}, {args.pixels} pixels, reduce={args.reduce}, "
             f"{args.draws} draws")
    plot_table(rows, out / "maskratio.png", title)
    report.write_csv(out / "maskratio.csv", rows, COLUMNS)
    table = report.markdown_table(rows, COLUMNS)
    (out / "maskratio.md").write_text(f"{title}\n\n{table}\nlowest intra/inter at mask ratio {best['mask_ratio']:g}\n")
    result = {
        "rows": rows,
        "best_mask_ratio": best["mask_ratio"],
        "best_intra_inter_ratio": best["intra_inter_ratio"],
        "settings": {k: getattr(args, k) for k in ("dataset", "split", "num_classes", "per_class", "draws", "reduce",
                                                    "pixels", "input_size", "patch_size", "seed")},
        "indices": [int(i) for i in indices],
    }
    report.write_json(out / "maskratio.json", result)
    print(table, end="")
    print(f"lowest intra/inter ratio {best['intra_inter_ratio']:.4f} at mask ratio {best['mask_ratio']:g}")
    print(f"wrote {out}")
    return result
