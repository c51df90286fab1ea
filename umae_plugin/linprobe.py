"""Linear probing of a pre-trained MAE / U-MAE encoder: the command line of `main_linprobe.py` /
`umae-linprobe` (`get_args_parser`, `check_args`, `main`) and the run (`run_linprobe`).

The reference probe trains a BatchNorm + linear head on the frozen encoder with LARS. With
`--cache_features` it trains on features of unaugmented images computed once and adds weighted
k-NN accuracy, for both the class-token and the mean-pooled features; `--lr_search` and
`--baselines` work on those features. The parts shared with fine-tuning are in `classify`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import time
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import checkpoint as ckpt
from . import baselines, cli, data, distributed
from .classify import (ConfigError, claim_output_folder, classifier_args, classifier_name, create_classifier,
                       evaluate_only, finish, fit, load_resume_state, percent, prologue, resolve_num_classes,
                       restore_missing_checkpoint, save_checkpoint)
from .classify import check_args as check_classifier_args
from .linprobe_cached import (HELD_OUT_FRACTION, LR_FACTORS, POOLS, evaluate_head, extract_pooled_features,
                              knn_accuracy, search_lr, train_head_epoch, train_linear_head)
from .logger import RunLog
from .optim import build_lars, resolve_lr
from .runtime import Runtime, record_args

log = logging.getLogger("umae")

KNN_K, KNN_TEMPERATURE = 20, 0.07


# ---------------------------------------------------------------------------------------------
# command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MAE linear probing for image classification")
    g = cli.groups(parser, cli.MODEL, cli.OPTIM, cli.DATA, cli.RUN, cli.LOGGING, cli.DIST)

    m = g[cli.MODEL]
    m.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                   help="Name of model to train: vit_*, or the mae_vit_* / umae_vit_* / simmim_vit_* name it "
                        "was pre-trained as")
    m.add_argument("--input_size", default=None, type=int,
                   help="images input size (None: the --finetune / --resume checkpoint's, else 224)")
    cli.add_classification_arguments(g, global_pool=False)
    m.add_argument("--cache_features", action="store_true",
                   help="extract frozen features of unaugmented images once (class token and mean pool in one "
                        "pass), train a probe on each pool, add k-NN accuracy")

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=512, epochs=90, weight_decay=0, blr=0.1, min_lr=0.0, warmup_epochs=10,
                               weight_decay_help="weight decay (0 for linear probe following MoCo v1)")
    o.add_argument("--lr_search", action="store_true",
                   help="with --cache_features: pick each head's lr from the lr (--lr, or --blr scaled) x "
                        "{0.1, 0.3, 1, 3, 10} on a stratified 10%% of the training set (seeded by --seed; "
                        "never the val set), then train on all of it; logged as probe_lr")

    r = g[cli.RUN]
    r.add_argument("--baselines", action="store_true",
                   help="with --cache_features: also log raw-pixel baselines (logistic regression, k-NN) and "
                        "the same model freshly initialised (seeded by --seed) probed the same way")

    cli.add_run_arguments(g, "dataset path (imagefolder: holds train/ and val/; cifar10: its root)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the flag (exit status 2, as argparse)."""
    try:
        check_linprobe_flags(args)
        return check_classifier_args(args, "linprobe")
    except ConfigError as err:
        parser.error(str(err))


def main(args: argparse.Namespace) -> dict:
    return run_linprobe(check_args(get_args_parser(), args))


def entry() -> None:
    """`umae-linprobe` (and `python main_linprobe.py`)."""
    cli.run_main(get_args_parser, main)


# ---------------------------------------------------------------------------------------------
# the run


def build_linprobe_model(name: str, args: argparse.Namespace, source: Mapping | None) -> nn.Module:
    """The reference probe: the classifier with `source`'s encoder, head weight trunc-normal(0.01)
    and bias 0, the head behind a BatchNorm without affine parameters, all else frozen."""
    model = create_classifier(name, args)
    if source is not None:
        log.info("loading the encoder of --finetune %s", args.finetune)
        ckpt.load_pretrained(model, source, f"--finetune {args.finetune}")  # logs loaded / fresh / ignored keys
    nn.init.trunc_normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)
    model.head = ckpt.linear_probe_head(model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def run_linprobe(args: argparse.Namespace) -> dict[str, Any]:
    """Linear probing as the reference script (or on cached features with `--cache_features`).

    Returns the last epoch's val `acc1`, `acc5` (fractions), `loss`, `max_acc1`, and with
    `--cache_features` the weighted k-NN `knn_acc1`, `knn_acc5`, both pools' `test_acc{1,5}_cls`,
    `test_acc{1,5}_mean`, `knn_acc{1,5}_cls`, `knn_acc{1,5}_mean` (the unsuffixed keys are the
    requested pool's), the heads' lr `probe_lr` (requested pool), `probe_lr_cls`, `probe_lr_mean`,
    and with `--baselines` `raw_pixels_{logreg,knn}_acc{1,5}`, `random_init_acc{1,5}`,
    `random_init_knn_acc{1,5}`, `random_init_probe_lr` (`_linprobe_cached`)."""
    with contextlib.ExitStack() as run:  # holds the output folder's lock (`claim_output_folder`)
        return finish(_run_linprobe(args, run))


def check_linprobe_flags(args: argparse.Namespace) -> None:
    """`--lr_search` and `--baselines` work on cached features only; raises `ConfigError`."""
    for flag in ("lr_search", "baselines"):
        if getattr(args, flag, False) and not args.cache_features:
            raise ConfigError(f"--{flag} needs --cache_features (it works on features extracted once)")


def _run_linprobe(args: argparse.Namespace, run: contextlib.ExitStack | None = None) -> dict[str, Any]:
    check_linprobe_flags(args)
    rt, name, resume_state, source = prologue(args, "linprobe", get_args_parser())
    cached = args.cache_features and not args.eval
    train_tf = data.eval_transform(args.input_size) if cached else data.linprobe_transform(args.input_size, True)
    # Data first: a wrong path fails before anything expensive is built.
    train_set = None if args.eval else data.build_dataset(args.dataset, args.data_path, "train", train_tf, args.download)
    if train_set is not None and not cached:  # the cached probe trains on all features if fewer than a batch
        data.require_full_batch(train_set, args.batch_size, rt.world_size)
    val_set = data.build_dataset(args.dataset, args.data_path, "val", data.linprobe_transform(args.input_size, False),
                                 args.download)
    resolve_num_classes(args, train_set, val_set)
    claim_output_folder(run, args, rt)

    record = classifier_args(name, args, head="batchnorm")  # what build_linprobe_model builds; saved with it
    model = build_linprobe_model(name, args, source).to(rt.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args.lr = resolve_lr(args.lr, args.blr, args.batch_size, args.accum_iter, rt.world_size)
    log.info("model %s, input %d px, patch %d: %d trainable parameters; effective batch %d, lr %.3e (blr %.3e)",
             name, args.input_size, args.patch_size, n_parameters,
             args.batch_size * args.accum_iter * rt.world_size, args.lr, args.blr)
    optimizer = build_lars(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    pin = args.pin_mem and rt.device.type == "cuda"

    if args.eval:
        return evaluate_only(model, val_set, args, rt, resume_state)
    if cached:
        return _linprobe_cached(args, rt, model, optimizer, train_set, val_set, resume_state, n_parameters, pin,
                                record)
    return fit(args, rt, model, nn.CrossEntropyLoss(), optimizer, train_set, val_set, resume_state, n_parameters,
               model_args=record)


def _broadcast(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (DDP does this when it wraps a model)."""
    if distributed.get_world_size() > 1:
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, 0)


def _linprobe_cached(
    args: argparse.Namespace,
    rt: Runtime,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Dataset,
    val_set: Dataset,
    resume_state: Mapping | None,
    n_parameters: int,
    pin: bool,
    model_args: Mapping[str, Any],
) -> dict[str, Any]:
    """`--cache_features`: features of unaugmented images once, then the heads on them. Every
    process extracts its shard and trains the same heads on all features (no DDP needed); a
    head's batch is the effective batch `batch_size * accum_iter * world_size`.

    One pass of the frozen encoder gives both pools (`linprobe_cached.cls_and_mean_features`
    states what each is for a `--global_pool` and a `--cls_token` classifier), and a head is
    trained on each with the same protocol (same initial weights, LARS, schedule, batches),
    epoch by epoch in step. The requested pool's head (`--global_pool`: mean, `--cls_token`:
    cls) is `model.head`: its numbers are `acc1` / `test_acc1` / `knn_acc1` as before, and the
    checkpoint holds it as `model` (strict-loadable); the other pool's head is the checkpoint's
    `other_pool` entry. `--lr_search`: each pool's lr is picked by `linprobe_cached.search_lr` on
    a stratified 10% of the training features (split seeded by `--seed`; val is never seen) and
    kept in the checkpoint (`lr_search`), so a resumed run reuses it. `--baselines`: raw-pixel
    and random-initialisation baselines (`umae_plugin.baselines`), computed once."""
    run_log = RunLog(args.output_dir or None, args.log_dir or None, enabled=rt.is_main)
    pool = "mean" if args.global_pool else "cls"
    other = "cls" if pool == "mean" else "mean"
    lr_search = bool(getattr(args, "lr_search", False))
    fresh = copy.deepcopy(model.head)  # the initial head: the start of both pools' heads and of every lr tried
    _broadcast(fresh)
    other_head = copy.deepcopy(fresh)
    other_optimizer = build_lars(other_head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_epoch, max_acc1 = args.start_epoch, 0.0
    other_start, searched = args.start_epoch, None
    if resume_state is not None:
        start = load_resume_state(resume_state, model, optimizer, seed=args.seed)
        start_epoch = start if start is not None else start_epoch
        max_acc1 = float(resume_state.get("max_accuracy", 0.0))
        saved = resume_state.get("other_pool")
        if isinstance(saved, Mapping) and saved.get("pool") == other:
            other_head.load_state_dict(saved["head"])
            if start is not None and "optimizer" in saved and "epoch" in saved:
                other_optimizer.load_state_dict(saved["optimizer"])
                other_start = int(saved["epoch"]) + 1
        if lr_search and isinstance(resume_state.get("lr_search"), Mapping) and set(resume_state["lr_search"]) == set(POOLS):
            searched = {p: float(v) for p, v in resume_state["lr_search"].items()}
            log.info("lr search: the checkpoint's choice, %s", searched)
        if rt.is_main and resume_state.get("log_stats"):
            run_log.write_epoch(resume_state["log_stats"])
    _broadcast(model)
    record_args(args, rt.is_main, args.output_dir)
    restore_missing_checkpoint(args, rt, resume_state)

    loaders = [data.build_loader(s, args.batch_size, train=False, num_workers=args.num_workers, pin_memory=pin)
               for s in (train_set, val_set)]
    start = time.time()
    (train_feats, train_labels), (val_feats, val_labels) = [
        extract_pooled_features(model, loader, rt.device, rt.autocast, compile_forward=args.compile,
                                print_freq=args.print_freq)
        for loader in loaders]
    log.info("cached features (class token and mean pool, one pass): train %s, val %s in %.1f s",
             tuple(train_feats[pool].shape), tuple(val_feats[pool].shape), time.time() - start)
    knn = {p: knn_accuracy(train_feats[p], train_labels, val_feats[p], val_labels, k=KNN_K,
                           temperature=KNN_TEMPERATURE, num_classes=args.nb_classes) for p in POOLS}
    for p in POOLS:
        log.info("weighted %d-NN (T=%g), %s: top-1 %.2f%%, top-5 %.2f%%", KNN_K, KNN_TEMPERATURE, p,
                 knn[p]["acc1"] * 100, knn[p]["acc5"] * 100)

    batch = args.batch_size * args.accum_iter * rt.world_size
    schedule = dict(epochs=args.epochs, batch_size=batch, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                    seed=args.seed)
    lrs = {p: args.lr for p in POOLS}
    if lr_search:
        if searched is None:
            searched = {p: search_lr(fresh, train_feats[p], train_labels, base_lr=args.lr,
                                     weight_decay=args.weight_decay, **schedule)[0] for p in POOLS}
            log.info("lr search (held-out %d%% of train, lr %.3e x %s): picked %s", round(HELD_OUT_FRACTION * 100),
                     args.lr, LR_FACTORS, searched)
        lrs = searched
    baseline_stats: dict[str, float] = {}
    if getattr(args, "baselines", False):
        baseline_stats = _linprobe_baselines(args, rt, train_set, val_set, pin, batch, lr_search)
    constant_line = {
        **percent({"test_knn_acc1": knn[pool]["acc1"], "test_knn_acc5": knn[pool]["acc5"],
                    **{f"knn_{m}_{p}": knn[p][m] for p in POOLS for m in ("acc1", "acc5")}, **baseline_stats}),
        "probe_lr": lrs[pool], **{f"probe_lr_{p}": lrs[p] for p in POOLS},
    }

    def train_other(epoch: int) -> dict[str, float]:
        stats = train_head_epoch(other_head, train_feats[other], train_labels, other_optimizer, epoch=epoch,
                                 lr=lrs[other], **schedule)
        return stats

    if other_start < start_epoch:
        log.info("the checkpoint holds no %s-pool head at epoch %d: training it for epochs %d..%d",
                 other, start_epoch - 1, other_start, start_epoch - 1)
    for epoch in range(other_start, start_epoch):
        train_other(epoch)
    other_val: dict[str, float] | None = None

    def on_epoch_end(epoch: int, train_stats: dict, val_stats: dict) -> None:
        nonlocal max_acc1, other_val
        train_other(epoch)
        other_val = evaluate_head(other_head, val_feats[other], val_labels)
        by_pool = {pool: val_stats, other: other_val}
        max_acc1 = max(max_acc1, val_stats["acc1"])
        line = {**{f"train_{k}": v for k, v in train_stats.items()},
                **percent({f"test_{k}": v for k, v in val_stats.items()}),
                **percent({f"test_{m}_{p}": by_pool[p][m] for p in POOLS for m in ("acc1", "acc5")}),
                **constant_line, "epoch": epoch, "n_parameters": n_parameters}
        if args.output_dir and rt.is_main:
            state = ckpt.training_state(
                model, optimizer, epoch, args=args, model_args=model_args, log_stats=line, max_accuracy=max_acc1,
                other_pool={"pool": other, "head": other_head.state_dict(),
                            "optimizer": other_optimizer.state_dict(), "epoch": epoch},
                lr_search=dict(lrs) if lr_search else None)
            save_checkpoint(args.output_dir, state, epoch, args.save_freq, last=epoch + 1 == args.epochs)
        run_log.write_epoch(line)
        run_log.scalars({f"perf/test_{k}": v for k, v in percent(val_stats).items()}, epoch)
        run_log.scalars({f"perf/test_acc1_{p}": by_pool[p]["acc1"] * 100 for p in POOLS}, epoch)
        log.info("epoch %d: train loss %.4f, val top-1 %.2f%% (max %.2f%%); %s pool %.2f%%", epoch,
                 train_stats["loss"], val_stats["acc1"] * 100, max_acc1 * 100, other, other_val["acc1"] * 100)

    result = train_linear_head(
        model.head, train_feats[pool], train_labels, epochs=args.epochs, batch_size=batch, lr=lrs[pool],
        min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, optimizer=optimizer, start_epoch=start_epoch,
        seed=args.seed, val_feats=val_feats[pool], val_labels=val_labels, on_epoch_end=on_epoch_end,
    )
    if other_val is None:  # no epoch left to train: the other head as it is
        other_val = evaluate_head(other_head, val_feats[other], val_labels)
    by_pool = {pool: result, other: other_val}
    max_acc1 = max(max_acc1, result["acc1"])
    log.info("Accuracy of the network on the %d test images: %.1f%%", len(val_set), result["acc1"] * 100)
    log.info("Max accuracy: %.2f%%", max_acc1 * 100)
    run_log.close()
    return {**result, "max_acc1": max_acc1, "knn_acc1": knn[pool]["acc1"], "knn_acc5": knn[pool]["acc5"],
            **{f"test_{m}_{p}": by_pool[p][m] for p in POOLS for m in ("acc1", "acc5")},
            **{f"knn_{m}_{p}": knn[p][m] for p in POOLS for m in ("acc1", "acc5")},
            "probe_lr": lrs[pool], **{f"probe_lr_{p}": lrs[p] for p in POOLS}, **baseline_stats,
            "wall_time_s": time.time() - start}


def _linprobe_baselines(
    args: argparse.Namespace, rt: Runtime, train_set: Dataset, val_set: Dataset, pin: bool, batch: int,
    lr_search: bool,
) -> dict[str, float]:
    """`--baselines`: raw pixels (logistic regression, k-NN) of the same eval-transformed images,
    and the same classifier freshly initialised from `--seed`, probed with the same protocol
    (requested pool, schedule, and lr search when on)."""
    start = time.time()
    stats = baselines.raw_pixel_baselines(train_set, val_set, num_classes=args.nb_classes, k=KNN_K,
                                          temperature=KNN_TEMPERATURE, seed=args.seed,
                                          batch_size=args.batch_size, num_workers=args.num_workers)
    name = classifier_name(args.model)
    stats.update(baselines.random_init_baseline(
        lambda: create_classifier(name, args), train_set, val_set, num_classes=args.nb_classes, epochs=args.epochs,
        batch_size=batch, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay, seed=args.seed, lr_search=lr_search, device=rt.device, autocast=rt.autocast,
        loader_batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin, print_freq=args.print_freq,
        k=KNN_K, temperature=KNN_TEMPERATURE))
    log.info("baselines in %.1f s: %s", time.time() - start,
             ", ".join(f"{k} {v * 100:.2f}%" if "acc" in k else f"{k} {v:.3g}" for k, v in stats.items()))
    return stats
