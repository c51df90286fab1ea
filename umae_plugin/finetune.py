"""Fine-tuning of a pre-trained MAE / U-MAE encoder: the command line of `main_finetune.py` /
`umae-finetune` (`get_args_parser`, `check_args`, `main`) and the run (`run_finetune`).

The reference recipe: layer-wise lr decay, drop path, RandAugment, random erasing, mixup / cutmix
and label smoothing; `--eval` evaluates a `--resume` checkpoint. The parts shared with linear
probing are in `classify`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import cli, data
from .classify import (ConfigError, claim_output_folder, classifier_args, create_classifier, evaluate_only, finish, fit,
                       mixup_active, prologue, resolve_num_classes)
from .classify import check_args as check_classifier_args
from .optim import param_groups_layer_decay, resolve_lr
from .runtime import adamw_options

log = logging.getLogger("umae")


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MAE fine-tuning for image classification")
    g = cli.groups(parser, cli.MODEL, cli.OPTIM, cli.AUGMENT, cli.DATA, cli.RUN, cli.LOGGING, cli.DIST)

    m = g[cli.MODEL]
    m.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                   help="Name of model to train: vit_*, or the mae_vit_* / umae_vit_* / simmim_vit_* name it "
                        "was pre-trained as")
    m.add_argument("--input_size", default=224, type=int, help="images input size")
    m.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="Drop path rate")
    cli.add_classification_arguments(g, global_pool=True)

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=64, epochs=50, weight_decay=0.05, blr=1e-3, min_lr=1e-6, warmup_epochs=5)
    o.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="Clip gradient norm (None: no clipping)")
    o.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")
    o.add_argument("--smoothing", type=float, default=0.1, help="Label smoothing")

    a = g[cli.AUGMENT]
    a.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                   help="Color jitter factor (enabled only when not using Auto/RandAug)")
    a.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help='Use AutoAugment policy. "v0" or "original", or a RandAugment string')
    a.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="Random erase prob")
    a.add_argument("--remode", type=str, default="pixel", help="Random erase mode")
    a.add_argument("--recount", type=int, default=1, help="Random erase count")
    a.add_argument("--resplit", action="store_true", default=False,
                   help="Do not random erase first (clean) augmentation split (accepted; no effect, as upstream)")
    a.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0.")
    a.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0.")
    a.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    a.add_argument("--mixup_prob", type=float, default=1.0,
                   help="Probability of performing mixup or cutmix when either/both is enabled")
    a.add_argument("--mixup_switch_prob", type=float, default=0.5,
                   help="Probability of switching to cutmix when both mixup and cutmix enabled")
    a.add_argument("--mixup_mode", type=str, default="batch",
                   help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    cli.add_run_arguments(g, "dataset path (imagefolder: holds train/ and val/; cifar10: its root)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the flag (exit status 2, as argparse)."""
    try:
        return check_classifier_args(args, "finetune")
    except ConfigError as err:
        parser.error(str(err))


def main(args: argparse.Namespace) -> dict:
    return run_finetune(check_args(get_args_parser(), args))


def entry() -> None:
    """`umae-finetune` (and `python main_finetune.py`)."""
    cli.run_main(get_args_parser, main)


# ---------------------------------------------------------------------------------------------
# the run


def build_finetune_model(name: str, args: argparse.Namespace, source: Mapping | None) -> nn.Module:
    """The classifier with drop path and `source`'s encoder; a freshly initialised head gets the
    reference's trunc-normal(2e-5) weights."""
    model = create_classifier(name, args, drop_path_rate=args.drop_path)
    if source is not None:
        log.info("loading the encoder of --finetune %s", args.finetune)
        report = ckpt.load_pretrained(model, source, f"--finetune {args.finetune}")  # logs loaded / fresh / ignored
        if "head.weight" in report.fresh:
            nn.init.trunc_normal_(model.head.weight, std=2e-5)
    return model


def build_criterion(args: argparse.Namespace) -> nn.Module:
    """Soft-target cross-entropy with mixup / cutmix, else label smoothing, else cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tuning (or `--eval` of a `--resume` checkpoint) as the reference script. Returns the
    last epoch's val `acc1`, `acc5` (fractions), `loss` and `max_acc1`."""
    with contextlib.ExitStack() as run:  # holds the output folder's lock (`claim_output_folder`)
        return finish(_run_finetune(args, run))


def _run_finetune(args: argparse.Namespace, run: contextlib.ExitStack | None = None) -> dict[str, Any]:
    rt, name, resume_state, source = prologue(args, "finetune", get_args_parser())
    train_set = None
    if not args.eval:
        train_tf = data.finetune_transform(args.input_size, True, color_jitter=args.color_jitter, aa=args.aa,
                                           reprob=args.reprob, remode=args.remode, recount=args.recount)
        train_set = data.build_dataset(args.dataset, args.data_path, "train", train_tf, args.download)
        data.require_full_batch(train_set, args.batch_size, rt.world_size)
    val_set = data.build_dataset(args.dataset, args.data_path, "val", data.finetune_transform(args.input_size, False),
                                 args.download)
    resolve_num_classes(args, train_set, val_set)
    claim_output_folder(run, args, rt)

    mixup_fn = None
    if mixup_active(args):
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        log.info("mixup / cutmix on: mixup %g, cutmix %g, mode %s", args.mixup, args.cutmix, args.mixup_mode)

    record = classifier_args(name, args, drop_path_rate=args.drop_path)  # what build_finetune_model builds
    model = build_finetune_model(name, args, source).to(rt.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args.lr = resolve_lr(args.lr, args.blr, args.batch_size, args.accum_iter, rt.world_size)
    log.info("model %s, input %d px, patch %d: %.2fM parameters; effective batch %d, lr %.3e (blr %.3e)",
             name, args.input_size, args.patch_size, n_parameters / 1e6,
             args.batch_size * args.accum_iter * rt.world_size, args.lr, args.blr)
    groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay,
                                      no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, **adamw_options(rt.device))

    if args.eval:
        return evaluate_only(model, val_set, args, rt, resume_state)
    return fit(args, rt, model, build_criterion(args), optimizer, train_set, val_set, resume_state, n_parameters,
               model_args=record, mixup_fn=mixup_fn, clip_grad=args.clip_grad)
