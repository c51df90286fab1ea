"""Mask ratio and class separation in pixel space (paper Sec. 4.2, Fig. 2b-c, appendix B.2).

    python -m umae_plugin.analysis maskratio --dataset imagefolder --data_path /imagenet \
        --num_classes 10 --per_class 10 --samples 5 --draws 5 --input_size 224 --patch_size 16 \
        --output_dir out/maskratio
    python -m umae_plugin.analysis maskratio --dataset digits --input_size 32 --patch_size 4

The paper's argument: masking connects images of one class through their shared visible parts,
so a good mask ratio makes masked images of one class close relative to images of other classes.
Measured here, with no model:

* images: `--samples` S independent image samples, sample s drawn with seed `--seed` + s:
  `--num_classes` random classes x `--per_class` random images of the `--split` (samples may
  share images), resized and center-cropped to `--input_size` (the evaluation transform);
  `--pixels normalized` (default) uses the ImageNet-normalised pixels the model sees,
  `--pixels raw` the [0, 1] RGB values of the same crop;
* patches: non-overlapping `--patch_size` squares, each flattened to a p*p*C vector (row-major
  patch grid, channels last, as `MaskedAutoencoderViT.patchify`);
* masks: every image is masked independently, uniformly at random, keeping
  `max(1, int(L * (1 - ratio)))` of its L patches (the model's rule); `--draws` D independent
  draws per ratio and sample, from a generator seeded with `--seed` + s;
* distance of two masked images: over all pairs (a visible patch of one, a visible patch of the
  other), the l2 distances of the patch vectors, reduced by `--reduce max` (appendix B.2, the
  default) or `--reduce mean` (Sec. 4.2);
* intra-class distance: the mean over pairs of distinct images of one class; inter-class: over
  pairs of images of different classes. The ratio intra / inter: lower means better separated
  classes (the paper finds its minimum near a mask ratio of 0.7).

Per ratio the table gives (`COLUMNS`):

* `intra`, `inter`: the distances averaged over the D draws of a sample, then over the S samples;
  `intra_inter_ratio`: the mean over samples of each sample's ratio (its draw-averaged intra over
  its draw-averaged inter); with S = 1 exactly intra / inter;
* `intra_std`, `inter_std`, `ratio_std`: the spread over mask draws, within samples: the standard
  deviation over the D draws (of intra, inter, and the per-draw ratio), pooled over samples
  (root mean square of the S per-sample values); 0 when D = 1;
* `intra_sample_std`, `inter_sample_std`, `ratio_sample_std`: the spread over image samples: the
  standard deviation (ddof 1) of the S per-sample means; NaN when S = 1 (not measured);
* `ratio_total_std`: the error bar of the figure, `sqrt(ratio_std^2 + ratio_sample_std^2)` (just
  `ratio_std` when S = 1);
* `lowest_in_samples`: in how many of the S samples this ratio has the lowest intra / inter (the
  samples are shared by all ratios, so this compares the ratios on the same images).

The figure marks the lowest mean ratio with a star only when its error bar separates it from every
other ratio's (`separated_minimum`). Patch-to-patch distances do not depend on the masks, so they
are computed once per block of images (`torch.cdist`) and every mask draw of every ratio only
reduces them. Writes `maskratio.csv`, `maskratio.md`, `maskratio.json` and `maskratio.png`.
"""
from __future__ import annotations

import argparse
import logging
import math
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
           "ratio_std", "intra_sample_std", "inter_sample_std", "ratio_sample_std", "ratio_total_std",
           "lowest_in_samples")


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


def per_draw_distances(
    patches: torch.Tensor,
    labels: torch.Tensor,
    ratios: Sequence[float],
    *,
    draws: int,
    reduce: str = "max",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(intra, inter), each [R, D] float64 on the CPU: the class means of one image sample under
    D mask draws of each of the R ratios (masks from a generator seeded with `seed`)."""
    g = torch.Generator().manual_seed(seed)
    n, length, _ = patches.shape
    visible = torch.cat([random_visible(draws, n, length, r, g) for r in ratios])  # [R * D, N, L]
    intra, inter = class_means(masked_image_distances(patches, visible, reduce), labels)
    return intra.view(len(ratios), draws).double().cpu(), inter.view(len(ratios), draws).double().cpu()


def _pooled_std(x: torch.Tensor) -> torch.Tensor:
    """x [S, R, D] -> [R]: the std over D (ddof 1; 0 when D = 1), root mean square over S."""
    if x.shape[-1] < 2:
        return x.new_zeros(x.shape[1])
    return x.var(dim=-1).mean(dim=0).sqrt()


def _sample_std(x: torch.Tensor) -> torch.Tensor:
    """x [S, R] -> [R]: the std over S (ddof 1); NaN when S = 1."""
    if x.shape[0] < 2:
        return x.new_full((x.shape[1],), math.nan)
    return x.std(dim=0)


def patches_len(samples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The number of patches L shared by every sample's patches [N, L, d]."""
    lengths = {int(p.shape[1]) for p, _ in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples differ in their number of patches: {sorted(lengths)}")
    return lengths.pop()


def mask_ratio_study(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    draws: int = 5,
    reduce: str = "max",
    seed: int = 0,
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Rows (see `COLUMNS` and the module docstring) for S image samples, each (patches [N, L, d],
    labels [N]); sample s is masked with seed `seed` + s. Also returns the per-sample ratios
    [S, R] (each sample's draw-averaged intra over its draw-averaged inter)."""
    if not samples:
        raise ValueError("need at least one image sample")
    length = patches_len(samples)
    pairs = [per_draw_distances(p, y, ratios, draws=draws, reduce=reduce, seed=seed + s)
             for s, (p, y) in enumerate(samples)]
    intra = torch.stack([a for a, _ in pairs])  # [S, R, D]
    inter = torch.stack([b for _, b in pairs])
    intra_m, inter_m = intra.mean(-1), inter.mean(-1)  # [S, R] per-sample means over draws
    ratio_s = intra_m / inter_m  # [S, R]
    draw_std = {"intra": _pooled_std(intra), "inter": _pooled_std(inter), "ratio": _pooled_std(intra / inter)}
    sample_std = {"intra": _sample_std(intra_m), "inter": _sample_std(inter_m), "ratio": _sample_std(ratio_s)}
    total = draw_std["ratio"].hypot(sample_std["ratio"].nan_to_num(0.0))
    lowest = torch.bincount(ratio_s.argmin(dim=1), minlength=len(ratios))
    rows = []
    for i, r in enumerate(ratios):
        rows.append({
            "mask_ratio": float(r),
            "visible_patches": max(1, int(length * (1 - r))),
            "intra": intra_m[:, i].mean().item(),
            "inter": inter_m[:, i].mean().item(),
            "intra_inter_ratio": ratio_s[:, i].mean().item(),
            **{f"{k}_std": v[i].item() for k, v in draw_std.items()},
            **{f"{k}_sample_std": v[i].item() for k, v in sample_std.items()},
            "ratio_total_std": total[i].item(),
            "lowest_in_samples": int(lowest[i]),
        })
    return rows, ratio_s


def mask_ratio_table(
    patches: torch.Tensor,
    labels: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    draws: int = 5,
    reduce: str = "max",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per ratio (see `COLUMNS`) for one image sample, patches [N, L, d] of images with
    `labels`: `mask_ratio_study` with S = 1 (sample spreads NaN)."""
    return mask_ratio_study([(patches, labels)], ratios, draws=draws, reduce=reduce, seed=seed)[0]


def separated_minimum(mean: Sequence[float], spread: Sequence[float]) -> int | None:
    """Index of the lowest mean when its interval [mean - spread, mean + spread] lies entirely
    below every other one's, else None."""
    mean, spread = np.asarray(mean, dtype=float), np.nan_to_num(np.asarray(spread, dtype=float))
    best = int(mean.argmin())
    others = np.delete(mean - spread, best)
    if others.size and mean[best] + spread[best] < others.min():
        return best
    return None


def spread_label(rows: Sequence[dict[str, Any]]) -> str:
    """What the error bars cover, for legends and captions."""
    if any(not math.isnan(row.get("ratio_sample_std", math.nan)) for row in rows):
        return "± 1 std over image samples and mask draws"
    return "± 1 std over mask draws only"


def plot_table(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Left: intra- and inter-class distance; right: their ratio. Bands and error bars: 1 std over
    image samples and mask draws (`ratio_total_std`; mask draws only when there is one sample).
    Legends sit above the axes, so they hide no data."""
    r = np.array([row["mask_ratio"] for row in rows])
    fig = report.new_figure(1000, 440)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, colour in (("intra", "tab:blue"), ("inter", "tab:orange")):
        mean = np.array([row[key] for row in rows])
        std = np.hypot(np.array([row[f"{key}_std"] for row in rows], dtype=float),
                       np.nan_to_num(np.array([row.get(f"{key}_sample_std") for row in rows], dtype=float)))
        ax1.plot(r, mean, marker="o", color=colour, label=f"{key}-class")
        ax1.fill_between(r, mean - std, mean + std, color=colour, alpha=0.2)
    ax1.set_xlabel("mask ratio (fraction of patches removed)")
    ax1.set_ylabel("distance between masked images (l2 of pixel values)")
    ax1.grid(True, alpha=0.3)
    ratio = np.array([row["intra_inter_ratio"] for row in rows])
    spread = np.array([row.get("ratio_total_std", row.get("ratio_std", 0.0)) for row in rows], dtype=float)
    ax2.errorbar(r, ratio, yerr=spread, marker="o", color="tab:green", capsize=3, label="intra / inter")
    best = separated_minimum(ratio, spread)
    if best is not None:  # a minimum the error bars separate
        ax2.plot([r[best]], [ratio[best]], marker="*", markersize=14, color="tab:red", label=f"lowest at {r[best]:g}")
    ax2.set_xlabel("mask ratio (fraction of patches removed)")
    ax2.set_ylabel("intra / inter (unitless)")
    ax2.grid(True, alpha=0.3)
    for ax in (ax1, ax2):
        ax.set_xticks(r, [f"{x:g}" for x in r])
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\npoints: means; bands and error bars: {spread_label(rows)}", fontsize=9)
    fig.tight_layout()
    return report.save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("maskratio: intra- / inter-class distance of masked images", add_help=False)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--num_classes", default=10, type=int, help="random classes (0: all)")
    parser.add_argument("--per_class", default=10, type=int, help="random images per class")
    parser.add_argument("--samples", default=1, type=int,
                        help="independent image samples (seeds --seed, --seed + 1, ...); with 2 or more the error "
                             "bars cover image samples as well as mask draws")
    parser.add_argument("--draws", default=5, type=int, help="independent mask draws per ratio and sample")
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
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    device = F.device_from(args.device)  # DeviceError before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = F.build_eval_dataset(args.dataset, args.data_path, args.split, args.input_size)
    targets = F.targets_of(ds)
    samples, sample_indices = [], []
    for s in range(args.samples):
        indices = F.per_class_indices(targets, args.num_classes, args.per_class, args.seed + s)
        imgs, labels = F.stack_images(ds, indices)
        if args.pixels == "raw":
            imgs = imgs * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        samples.append((patchify(imgs, args.patch_size).to(device), labels))
        sample_indices.append([int(i) for i in indices])
    patches, labels = samples[0]
    log.info("maskratio: %d samples of %d images of %d classes, %d patches of dim %d, %d ratios x %d draws on %s",
             args.samples, len(labels), len(labels.unique()), patches.shape[1], patches.shape[2], len(args.ratios),
             args.draws, device)
    rows, per_sample = mask_ratio_study(samples, args.ratios, draws=args.draws, reduce=args.reduce, seed=args.seed)
    best = min(rows, key=lambda row: row["intra_inter_ratio"])
    separated = separated_minimum([row["intra_inter_ratio"] for row in rows], [row["ratio_total_std"] for row in rows])
    title = (f"{F.data_name(args.dataset, args.data_path, args.split)}: {len(labels.unique())} classes x {args.per_class} "
             f"images, {args.input_size}px / patch {args.patch_size}, {args.pixels} pixels, reduce={args.reduce}, "
             f"{args.samples} image sample{'s' if args.samples > 1 else ''} x {args.draws} mask draws")
    plot_table(rows, out / "maskratio.png", title)
    report.write_csv(out / "maskratio.csv", rows, COLUMNS)
    table = report.markdown_table(rows, COLUMNS)
    verdict = (f"lowest intra/inter at mask ratio {best['mask_ratio']:g}, "
               + ("separated from every other ratio by the error bars" if separated is not None
                  else "not separated from the others by the error bars") + f" ({spread_label(rows)})")
    (out / "maskratio.md").write_text(f"{title}\n\n{table}\n{verdict}\n")
    result = {
        "rows": rows,
        "best_mask_ratio": best["mask_ratio"],
        "best_intra_inter_ratio": best["intra_inter_ratio"],
        "best_separated": separated is not None,
        "settings": {k: getattr(args, k) for k in ("dataset", "split", "num_classes", "per_class", "samples", "draws",
                                                    "reduce", "pixels", "input_size", "patch_size", "seed")},
        "indices": sample_indices[0],
        "samples": [{"seed": args.seed + s, "indices": idx, "intra_inter_ratio": per_sample[s].tolist()}
                    for s, idx in enumerate(sample_indices)],
    }
    # NaN (a spread not measured) as null, so that strict JSON readers accept the file
    report.write_json(out / "maskratio.json", {**result, "rows": [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]})
    print(table, end="")
    print(f"lowest intra/inter ratio {best['intra_inter_ratio']:.4f} at mask ratio {best['mask_ratio']:g} "
          f"({'separated' if separated is not None else 'not separated'} by the error bars)")
    print(f"wrote {out}")
    return result
