"""Reconstruction grid of a pre-training checkpoint (the MAE demo's figure).

    python -m umae_plugin.analysis recon --checkpoint out/umae/checkpoint-399.pth \
        --dataset imagefolder --data_path /imagenet --num_images 4 --mask_ratio 0.75

One row per image (`--num_images` random images of the `--split`, seeded), four columns: the
original, the masked input (removed patches grey), the reconstruction (the decoder's prediction
for every patch), and the reconstruction with the visible patches pasted back. Masks are drawn by
the model's own `random_masking` under `torch.manual_seed(--seed)` (in a forked RNG state), so
they repeat on the same device type. Images are shown after undoing the ImageNet normalisation.

Models trained with `norm_pix_loss` predict each patch normalised by its own mean and variance.
The statistics of a removed patch are exactly what the model was not shown, so by default
(`--unnormalize visible`) every removed patch is un-normalised with statistics estimated from
the visible patches of the same image: the mean of their patch means, and the root of the mean of
their patch variances; visible patches use their own statistics. `--unnormalize oracle` uses the
true statistics of every patch (this leaks the hidden patches' mean and contrast into the
picture). The figure title says which was used.

Writes `recon.png` (exactly `4 * --cell_px` wide and `--num_images * --cell_px + HEADER_PX`
high) and `recon.json` (per image: the loss on removed patches in the model's target space, and
the mean squared error of the displayed reconstruction on removed patches in normalised pixels).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..models_mae import MaskedAutoencoderViT
from ..models_vit import VisionTransformerClassifier
from . import features as F
from . import report

log = logging.getLogger("umae")

HEADER_PX = 72
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def unnormalize_pred(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     mode: str = "visible") -> torch.Tensor:
    """Per-patch normalised predictions [N, L, P] back to pixels (as `norm_pix_loss` defines the
    target: (x - mean) / sqrt(var + 1e-6), unbiased variance over the patch vector).

    `target` [N, L, P] are the true patches and `mask` [N, L] (1 removed). `mode="visible"`:
    removed patches get each image's visible-patch estimate (mean of the visible patches' means,
    mean of their variances); `mode="oracle"`: every patch gets its own true statistics.
    """
    mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
    var = target.var(dim=-1, keepdim=True)
    if mode == "visible":
        vis = (1 - mask).unsqueeze(-1)  # [N, L, 1]
        count = vis.sum(dim=1, keepdim=True).clamp_min(1)
        est_mean = (mean * vis).sum(dim=1, keepdim=True) / count  # [N, 1, 1]
        est_var = (var * vis).sum(dim=1, keepdim=True) / count
        removed = mask.unsqueeze(-1).bool()
        mean = torch.where(removed, est_mean, mean)
        var = torch.where(removed, est_var, var)
    elif mode != "oracle":
        raise ValueError(f"mode must be 'visible' or 'oracle', got {mode!r}")
    return pred * (var + 1.0e-6).sqrt() + mean


def to_display(imgs: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [N, 3, H, W] -> [N, H, W, 3] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float, seed: int,
                unnormalize: str = "visible") -> dict[str, torch.Tensor]:
    """Masked forward pass with seeded masks -> images [N, 3, H, W] (normalised space) for the
    four columns, `mask` [N, L], per-image `loss` (removed patches, the model's target space) and
    `pixel_mse` (removed patches of the displayed reconstruction)."""
    model.eval()
    devices = [imgs.device] if imgs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio)
    pred = model.forward_decoder(latent, ids_restore).float()
    target = model.patchify(imgs)
    if model.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        loss_target = (target - mean) / (var + 1.0e-6) ** 0.5
        pixels = unnormalize_pred(pred, target, mask, unnormalize)
    else:
        loss_target, pixels = target, pred
    per_patch = ((pred - loss_target) ** 2).mean(-1)
    loss = (per_patch * mask).sum(1) / mask.sum(1).clamp_min(1)
    pixel_mse = (((pixels - target) ** 2).mean(-1) * mask).sum(1) / mask.sum(1).clamp_min(1)
    recon = model.unpatchify(pixels)
    removed = model.unpatchify(mask.unsqueeze(-1).expand_as(target).to(imgs.dtype))  # 1 where removed
    mean_t = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std_t = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    grey = (0.5 - mean_t) / std_t  # mid-grey once un-normalised for display
    return {
        "original": imgs,
        "masked": imgs * (1 - removed) + grey * removed,
        "reconstruction": recon,
        "reconstruction + visible": imgs * (1 - removed) + recon * removed,
        "mask": mask,
        "loss": loss,
        "pixel_mse": pixel_mse,
    }


def plot_grid(columns: dict[str, np.ndarray], path: str | Path, title: str, cell_px: int = 160) -> Path:
    """Rows of images [N, H, W, 3] under `COLUMNS` headings; exactly (4 * cell_px) x
    (N * cell_px + HEADER_PX) pixels."""
    n = len(columns[COLUMNS[0]])
    width, height = len(COLUMNS) * cell_px, n * cell_px + HEADER_PX
    fig = report.new_figure(width, height)
    pad = 2
    for row in range(n):
        for col, name in enumerate(COLUMNS):
            left = (col * cell_px + pad) / width
            bottom = ((n - 1 - row) * cell_px + pad) / height
            ax = fig.add_axes((left, bottom, (cell_px - 2 * pad) / width, (cell_px - 2 * pad) / height))
            ax.imshow(columns[name][row], interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, fontsize=8, pad=3)
    fig.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=7, wrap=True)
    return report.save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("recon: reconstruction grid of a pre-training checkpoint", add_help=False)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num_images", default=4, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--unnormalize", default="visible", choices=["visible", "oracle"],
                        help="norm_pix_loss models: statistics for removed patches (see the module docstring)")
    parser.add_argument("--norm_pix_loss", default=None, action=argparse.BooleanOptionalAction,
                        help="whether the model predicts normalised patches (default: the checkpoint's)")
    parser.add_argument("--cell_px", default=160, type=int, help="size of each image cell in pixels")
    F.add_data_args(parser)
    F.add_model_args(parser)
    F.add_runtime_args(parser, "analysis_out/recon")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.mask_ratio < 1.0:
        raise SystemExit(f"error: --mask_ratio must be in [0, 1), got {args.mask_ratio}")
    device = F.device_from(args.device)  # DeviceError before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = F.load_for_analysis(args.checkpoint, model=args.model, input_size=args.input_size, device=device)
    if isinstance(lm.model, VisionTransformerClassifier):
        raise SystemExit(f"error: {args.checkpoint} holds a classifier or an encoder-only export: it has no decoder, "
                         "nothing to reconstruct with")
    if not isinstance(lm.model, MaskedAutoencoderViT):
        raise SystemExit(f"error: {args.checkpoint} holds a {type(lm.model).__name__}, not an MAE pre-training model")
    if args.norm_pix_loss is not None:
        lm.model.norm_pix_loss = args.norm_pix_loss
    ds = F.build_eval_dataset(args.dataset, args.data_path, args.split, lm.input_size)
    indices = F.random_indices(len(ds), args.num_images, args.seed)
    imgs, labels = F.stack_images(ds, indices)
    res = reconstruct(lm.model, imgs.to(device), args.mask_ratio, args.seed, args.unnormalize)

    run = Path(args.checkpoint).resolve()
    title = (f"{run.parent.name}/{run.name} on {F.data_name(args.dataset, args.data_path, args.split)}: "
             f"mask ratio {args.mask_ratio:g}, seed {args.seed}")
    if lm.model.norm_pix_loss:
        note = ("norm_pix_loss: removed patches un-normalised with the mean/std of the visible patches "
                "(their own statistics are hidden)" if args.unnormalize == "visible" else
                "norm_pix_loss: every patch un-normalised with its own true mean/std (oracle: leaks hidden statistics)")
        title += "\n" + note
        log.info("recon: %s", note)
    plot_grid({name: to_display(res[name]) for name in COLUMNS}, out / "recon.png", title, args.cell_px)
    result = {
        "checkpoint": str(args.checkpoint),
        "mask_ratio": args.mask_ratio,
        "seed": args.seed,
        "norm_pix_loss": bool(lm.model.norm_pix_loss),
        "unnormalize": args.unnormalize if lm.model.norm_pix_loss else None,
        "images": [{"index": int(i), "label": int(y), "loss": float(l), "pixel_mse": float(m)}
                   for i, y, l, m in zip(indices, labels, res["loss"], res["pixel_mse"])],
    }
    report.write_json(out / "recon.json", result)
    for img in result["images"]:
        print(f"image {img['index']}: loss on removed patches {img['loss']:.4f}, pixel mse {img['pixel_mse']:.4f}")
    print(f"wrote {out / 'recon.png'}")
    return result
