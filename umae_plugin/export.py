"""Write a checkpoint as a timm or an HF transformers model folder.

    python -m umae_plugin.export CKPT OUT --to timm     # OUT/config.json + OUT/model.safetensors + README.md
    python -m umae_plugin.export CKPT OUT --to hf

CKPT is anything `checkpoint.load_model` rebuilds: this project's checkpoints, official MAE files,
classifiers, timm or HF transformers folders. OUT must not exist yet (or be empty); it appears
whole or not at all.

- `timm`: the encoder (and a classifier's head) as timm's own `VisionTransformer` in timm's
  local-dir layout, so `timm.create_model("local-dir:OUT", pretrained=True)` rebuilds it with no
  other argument, plain timm, no `umae_plugin` import. A pre-training model's features (`global_pool`
  "avg" over the final norm for mean pooling, "token" for the class token) are
  `model.forward_head(model.forward_features(x), pre_logits=True)`; a linear probe's BatchNorm is
  folded into its linear layer (exact in eval mode), as timm's head is one linear layer.
- `hf`: an MAE / U-MAE pre-training model as `ViTMAEForPreTraining` (encoder and decoder), an
  encoder-only checkpoint as `ViTMAEModel`, with the transformers-4 key names the Hub uses and a
  `config.json` matching the model (`layer_norm_eps` 1e-6, `norm_pix_loss`, the run's
  `mask_ratio`). SimMIM has no HF class and classifiers are not ViTMAE: both are refused.
Both write a `README.md` model card with the run's arguments and its last logged metrics (`log.txt`
beside CKPT). A checkpoint without "model_args" whose heads nothing names is refused, not guessed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import hf
from .errors import UsageError, UserError, one_line_errors
from .logger import read_log
from .models_mae import MaskedAutoencoderViT
from .models_simmim import SimMIMViT
from .models_vit import VisionTransformer
from .registry import parse_model_name

log = logging.getLogger("umae.export")

TARGETS = ("timm", "hf")
TIMM_EPS = 1e-6  # timm's VisionTransformer builds its LayerNorms with eps 1e-6, and takes no other from a config


def load_source(source: str | os.PathLike | Mapping[str, Any], model: str | None = None
                ) -> tuple[dict[str, Any], nn.Module]:
    """(the checkpoint dict with its "model_args" record, the model rebuilt from it in eval mode).
    A file without the record must name its heads (`num_heads`, `decoder_num_heads` or a model name
    in its args, or `model` here, e.g. "mae_vit_base_patch16" for an official encoder-only file):
    they change no weight's shape, and an export with guessed heads is a wrong model."""
    obj = ckpt.torch_load(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: not a checkpoint (a {type(obj).__name__})")
    if obj.get(ckpt.MODEL_ARGS_KEY) is None:
        try:
            saved = {**(ckpt.stored_args(obj) or {}), **({"model": model} if model else {})}
            record = ckpt.infer_model_args(ckpt.extract_state_dict(obj), saved, guess_heads=False)
        except ckpt.CheckpointMismatchError as err:
            raise UsageError(f"{source}: refusing to export: {err}") from None
        obj = {**obj, ckpt.MODEL_ARGS_KEY: record}
    try:
        return obj, ckpt.load_model(obj)
    except ckpt.CheckpointMismatchError as err:
        raise ckpt.CheckpointMismatchError(f"{source}: {err}") from None


def export_checkpoint(source: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike, to: str,
                      model: str | None = None) -> Path:
    """Write checkpoint `source` (a path or a loaded dict) to the new folder `out` as `to` ("timm" or
    "hf"), see the module docstring; `model` names the architecture of a file without "model_args"
    (`load_source`); returns `out`. The folder is written beside `out` and renamed into place, so a
    failure leaves nothing behind."""
    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; export writes a new folder")
    obj, net = load_source(source, model)
    write = _write_timm if to == "timm" else _write_hf
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        usage = write(net, obj, tmp).replace("OUT", os.fspath(out))  # the usage snippet names the folder
        (tmp / "README.md").write_text(model_card(obj, source, to, usage), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote %s (%s)", out, to)
    return out


# ---------------------------------------------------------------------------------------------
# timm


def _eps(model: nn.Module) -> float:
    return float(model.blocks[0].norm1.eps)


def timm_architecture(record: Mapping[str, Any]) -> str:
    """timm's ViT entry point for a record's encoder: `vit_<size>_patch<p>_224` where timm has that
    name (the export passes every shape anyway), else `vit_base_patch16_224`."""
    import timm

    try:
        name = f"{parse_model_name(record['name']).arch}_224"
    except ValueError:
        name = ""
    return name if timm.models.is_model(name) else "vit_base_patch16_224"


def timm_model_args(model: nn.Module) -> dict[str, Any]:
    """The `timm.create_model` keywords of timm's `VisionTransformer` equal to `model`'s encoder and
    head: the shapes, the pooling and the classes."""
    args: dict[str, Any] = dict(
        img_size=list(map(int, model.patch_embed.img_size)), patch_size=int(model.patch_embed.patch_size[0]),
        in_chans=int(model.patch_embed.proj.in_channels), embed_dim=int(model.patch_embed.proj.out_channels),
        depth=len(model.blocks), num_heads=int(model.blocks[0].attn.num_heads),
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.patch_embed.proj.out_channels, qkv_bias=True,
    )
    if isinstance(model, VisionTransformer):
        fc_norm = isinstance(model.fc_norm, nn.LayerNorm)
        args.update(global_pool="avg" if model.global_pool_enabled else "token", fc_norm=fc_norm,
                    num_classes=int(model.num_classes))
    else:  # a pre-training model: the features it pools from its normalised encoder output
        args.update(global_pool="avg" if model.feature_pool == "mean" else "token", fc_norm=False, num_classes=0)
    return args


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s encoder (and head) under timm's ViT keys, which are ours; a linear probe's
    `head.0` BatchNorm (no affine) folded into `head.1`: W (x - mu) / s + b = (W / s) x + b - W mu / s."""
    if isinstance(model, VisionTransformer):
        state = dict(model.state_dict())
    else:
        state = {k: v for k, v in model.state_dict().items()
                 if k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks.", "norm."))}
    if "head.1.weight" in state:
        bn, linear = model.head[0], model.head[1]
        scale = (bn.running_var + bn.eps).sqrt()
        weight = linear.weight / scale
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({"head.weight": weight, "head.bias": linear.bias - weight @ bn.running_mean})
    return state


def _write_timm(model: nn.Module, checkpoint: Mapping[str, Any], out: Path) -> str:
    import timm
    from timm.models import save_for_hf

    if not isinstance(model, (MaskedAutoencoderViT, SimMIMViT, VisionTransformer)):
        raise UsageError(f"--to timm: cannot export a {type(model).__name__}")
    if _eps(model) != TIMM_EPS:
        raise UsageError(f"--to timm: the model's LayerNorm eps is {_eps(model):g}; timm's ViT uses {TIMM_EPS:g}")
    record = checkpoint[ckpt.MODEL_ARGS_KEY]
    arch = timm_architecture(record)
    args = timm_model_args(model)
    cfg = {k: v for k, v in getattr(model, "pretrained_cfg", {}).items() if k not in ("file", "source", "state_dict")}
    cfg.update(architecture=arch, num_classes=args["num_classes"], classifier="head")
    target = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg, **args)
    target.load_state_dict(timm_state_dict(model), strict=True)
    save_for_hf(target.eval(), out, safe_serialization=True)
    return ("import timm\nmodel = timm.create_model(\"local-dir:OUT\", pretrained=True)  # plain timm\n"
            "features = model.forward_head(model.forward_features(x), pre_logits=True)  # [N, D]")


# ---------------------------------------------------------------------------------------------
# HF transformers


def _write_hf(model: nn.Module, checkpoint: Mapping[str, Any], out: Path) -> str:
    from safetensors.torch import save_file

    if isinstance(model, SimMIMViT):
        raise UsageError("--to hf: SimMIM has no HF transformers class (use --to timm for its encoder)")
    decoder = isinstance(model, MaskedAutoencoderViT)
    if not decoder and not (isinstance(model, VisionTransformer) and model.num_classes == 0
                            and isinstance(model.norm, nn.LayerNorm) and not isinstance(model.fc_norm, nn.LayerNorm)):
        raise UsageError(f"--to hf: a {type(model).__name__} with a head or fc_norm is not a ViTMAE encoder "
                         "(use --to timm)")
    args = ckpt.stored_args(checkpoint) or {}
    mask_ratio = args.get("mask_ratio")
    mask_ratio = float(mask_ratio) if isinstance(mask_ratio, (int, float)) and not isinstance(mask_ratio, bool) else 0.75
    config = hf.config_from_model(model, mask_ratio=mask_ratio)
    state = hf.to_hf_state_dict(model.state_dict(), decoder=decoder)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # transformers wants the format
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    cls = hf.PRETRAINING if decoder else hf.ENCODER
    usage = f"from transformers import {cls}\nmodel = {cls}.from_pretrained(\"OUT\")"
    if decoder:
        usage += "\nout = model(pixel_values=x, noise=noise)  # out.loss, out.logits [N, L, p*p*C], out.mask [N, L]"
    if getattr(model, "lambda_unif", 0) > 0:
        usage += (f"\n# out.loss is MAE's reconstruction loss: the run's uniformity term (lambda_unif "
                  f"{model.lambda_unif:g}) is not part of {cls}")
    return usage


# ---------------------------------------------------------------------------------------------
# the model card


def last_metrics(log_file: Path) -> dict[str, Any]:
    """The last JSON-lines record of a training `log.txt` (upstream's format) with its numbers; {}
    without one."""
    try:
        rows = read_log(log_file)
    except OSError:
        return {}
    return {k: v for k, v in rows[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)} if rows else {}


def model_card(checkpoint: Mapping[str, Any], source: Any, to: str, usage: str) -> str:
    """README.md of an exported folder: what it is, how to load it, the model record, the run's
    arguments and its last logged metrics."""
    record = checkpoint[ckpt.MODEL_ARGS_KEY]
    args = ckpt.stored_args(checkpoint) or {}
    where = Path(source) if isinstance(source, (str, os.PathLike)) else None
    metrics = last_metrics(where.parent / "log.txt") if where is not None and where.is_file() else {}
    library = "timm" if to == "timm" else "transformers"
    lines = ["---", f"library_name: {library}", "tags:", "- masked-image-modeling", "- mae", "- u-mae", "---", "",
             f"# {record['name']}", "",
             f"Exported by `python -m umae_plugin.export {where.name if where else 'CKPT'} OUT --to {to}` "
             "(umae: U-MAE for timm and the official MAE code).", "",
             "## Use", "", "```python", usage, "```", "",
             "## Model (`model_args`)", "", "```json", json.dumps(record, indent=2, sort_keys=True), "```", "",
             "## Final logged metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    else:
        lines.append("None: no `log.txt` beside the checkpoint.")
    lines += ["", "## Run arguments", ""]
    if args:
        lines += ["| argument | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in sorted(args.items())]
    else:
        lines.append("None stored in the checkpoint.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m umae_plugin.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file or timm / HF transformers folder")
    p.add_argument("out", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--to", required=True, choices=TARGETS, help="timm's local-dir layout or HF transformers ViTMAE")
    p.add_argument("--model", default=None,
                   help="the architecture of a checkpoint without model_args or a model name in its args "
                        "(e.g. mae_vit_base_patch16 for the official mae_pretrain_vit_base.pth): its heads")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    from .runtime import setup_logging

    setup_logging(True)
    with one_line_errors():
        out = export_checkpoint(args.checkpoint, args.out, args.to, args.model)
        print(f"wrote {out} ({args.to})")
        return out


def entry() -> None:
    """Console script `umae-export`."""
    main()


if __name__ == "__main__":
    main()
