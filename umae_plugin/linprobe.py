"""Linear probing of a pre-trained MAE / U-MAE encoder: the command line of `main_linprobe.py` /
`umae-linprobe` (`get_args_parser`, `check_args`, `main`) and the run (`run_linprobe`).

The reference probe trains a BatchNorm + linear head on the frozen encoder with LARS. With
`--cache_features` it trains on features of unaugmented images computed once and adds weighted
k-NN accuracy, for every named feature (`features.FEATURES`: `cls`, `mean`, `gpool`, the same
whichever classifier flag is given; the flag picks the headline one); `--lr_search` and
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
from .features import FEATURES, GPOOL_EPS, norm_state
from .linprobe_cached import (HELD_OUT_FRACTION, LR_FACTORS, NamedFeatures, evaluate_head, extract_named_features,
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
                   help="extract frozen features of unaugmented images once, every named feature in one pass "
                        "(cls: class token after the final norm; mean: mean of the patch tokens after it; gpool: "
                        "fc_norm of the un-normed patch-token mean), train a probe on each, add k-NN accuracy; "
                        "--global_pool / --cls_token pick the headline feature (gpool / cls), not the features")

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=512, epochs=90, weight_decay=0, blr=0.1, min_lr=0.0, warmup_epochs=10,
                               weight_decay_help="weight decay (0 for linear probe following MoCo v1)")
    o.add_argument("--lr_search", action="store_true",
                   help="with --cache_features: pick each head's lr from the lr (--lr, or --blr scaled) x "
                        "--lr_factors on a stratified 10%% of the training set (seeded by --seed; "
                        "never the val set), then train on all of it; logged as probe_lr")
    o.add_argument("--lr_factors", default=LR_FACTORS, type=_factors, metavar="F,F,...",
                   help="with --lr_search: the candidate lrs are the lr times these (default "
                        + ",".join(f"{f:g}" for f in LR_FACTORS) + "); an edge picked is warned about")

    r = g[cli.RUN]
    r.add_argument("--baselines", action="store_true",
                   help="with --cache_features: also log raw-pixel baselines (logistic regression, k-NN) and "
                        "the same model freshly initialised (seeded by --seed) probed the same way")

    cli.add_run_arguments(g, "dataset path (imagefolder: holds train/ and val/; cifar10: its root)")
    return parser


def _factors(text: str) -> tuple[float, ...]:
    """`0.1,1,10` -> (0.1, 1.0, 10.0): positive, distinct, ascending."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers") from None
    if not values or any(not v > 0 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive factors, distinct and ascending")
    return values


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
    `--cache_features` the weighted k-NN `knn_acc1`, `knn_acc5`, and per named feature F
    (`features`; `features_unavailable` those the source cannot give) `test_acc{1,5}_F`,
    `knn_acc{1,5}_F`, `probe_lr_F` (the unsuffixed keys are the headline `feature`'s),
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
                                record, name, source)
    return fit(args, rt, model, nn.CrossEntropyLoss(), optimizer, train_set, val_set, resume_state, n_parameters,
               model_args=record)


def _broadcast(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (DDP does this when it wraps a model)."""
    if distributed.get_world_size() > 1:
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, 0)


def headline_feature(args: argparse.Namespace) -> str:
    """The feature whose numbers are the run's `test_acc1` / `knn_acc1` / `probe_lr` and whose head
    is the checkpoint's `model`: what the trained classifier reads (`--global_pool`: `gpool`,
    `--cls_token`: `cls`)."""
    return "gpool" if args.global_pool else "cls"


def feature_norms(name: str, args: argparse.Namespace, model: nn.Module, source: Mapping | None,
                  resume_state: Mapping | None) -> tuple[nn.Module | None, nn.Module]:
    """(final norm or None, `gpool` fc_norm) for `NamedFeatures`, the same whichever classifier
    flag built `model`: a resumed run's saved `feature_norms`; else both classifier variants are
    built and loaded from `source` (`checkpoint.load_pretrained`), the final norm taken from the
    `--cls_token` one (None when the source has no `norm`: a fine-tuned `--global_pool`
    classifier) and fc_norm from the `--global_pool` one (fresh unless the source is such a
    classifier); without a source (a random-initialisation probe) the fresh ones."""
    dim = model.embed_dim
    saved = resume_state.get("feature_norms") if resume_state is not None else None
    if isinstance(saved, Mapping) and isinstance(saved.get("fc_norm"), Mapping):
        fc_norm = nn.LayerNorm(dim, eps=GPOOL_EPS)
        fc_norm.load_state_dict(saved["fc_norm"])
        final = None
        if isinstance(saved.get("final_norm"), Mapping):
            final = nn.LayerNorm(dim, eps=GPOOL_EPS)
            final.load_state_dict(saved["final_norm"])
        return final, fc_norm
    twins = {}
    for global_pool in (False, True):
        if bool(args.global_pool) == global_pool and source is None:
            twins[global_pool] = (model, None)
            continue
        twin_args = copy.copy(args)
        twin_args.global_pool = global_pool
        twin = create_classifier(name, twin_args)
        report = ckpt.load_pretrained(twin, source, f"--finetune {args.finetune}") if source is not None else None
        twins[global_pool] = (twin, report)
    cls_model, report = twins[False]
    has_norm = report is None or "norm.weight" in report.loaded
    final = copy.deepcopy(cls_model.norm) if has_norm else None
    return final, copy.deepcopy(twins[True][0].fc_norm)


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
    name: str = "",
    source: Mapping | None = None,
) -> dict[str, Any]:
    """`--cache_features`: features of unaugmented images once, then the heads on them. Every
    process extracts its shard and trains the same heads on all features (no DDP needed); a
    head's batch is the effective batch `batch_size * accum_iter * world_size`.

    One pass of the frozen encoder gives every named feature (`features.FEATURES`: `cls`, `mean`,
    `gpool`, defined once by `linprobe_cached.NamedFeatures`, the same whichever classifier flag
    is given; a source without a final norm has no `cls` / `mean`, logged as unavailable), and a
    head is trained on each with the same protocol (same initial weights, LARS, schedule,
    batches), epoch by epoch in step. The flag picks the headline feature (`headline_feature`:
    `--global_pool` gpool, `--cls_token` cls): its head is `model.head` and its numbers are
    `acc1` / `test_acc1` / `knn_acc1` / `probe_lr`; the checkpoint holds it as `model`
    (strict-loadable), the other heads under `feature_heads`, the norms under `feature_norms`.
    `--lr_search`: each feature's lr is picked by `linprobe_cached.search_lr` on a stratified 10%
    of the training features (split seeded by `--seed`; val is never seen) from `--lr` x
    `--lr_factors` and kept in the checkpoint (`lr_search`), so a resumed run reuses it.
    `--baselines`: raw-pixel and random-initialisation baselines (`umae_plugin.baselines`),
    computed once."""
    run_log = RunLog(args.output_dir or None, args.log_dir or None, enabled=rt.is_main)
    head_name = headline_feature(args)
    lr_search = bool(getattr(args, "lr_search", False))
    factors = tuple(getattr(args, "lr_factors", None) or LR_FACTORS)
    fresh = copy.deepcopy(model.head)  # the initial head: the start of every feature's head and of every lr tried
    _broadcast(fresh)
    start_epoch, max_acc1, searched = args.start_epoch, 0.0, None
    start = None
    if resume_state is not None:
        start = load_resume_state(resume_state, model, optimizer, seed=args.seed)
        start_epoch = start if start is not None else start_epoch
        max_acc1 = float(resume_state.get("max_accuracy", 0.0))
    final_norm, fc_norm = feature_norms(name, args, model, source, resume_state)
    extractor = NamedFeatures(model, final_norm, fc_norm).to(rt.device)
    names = extractor.names
    if head_name not in names:
        raise ConfigError(f"--cls_token: --finetune {args.finetune} has no final norm (a fine-tuned --global_pool "
                          "classifier?), so there is no class-token feature; use --global_pool")
    missing = [n for n in FEATURES if n not in names]
    if missing:
        log.info("features unavailable (the source has no final norm): %s", ", ".join(missing))
    others = [n for n in names if n != head_name]
    heads = {head_name: model.head, **{n: copy.deepcopy(fresh) for n in others}}
    optimizers = {head_name: optimizer, **{n: build_lars(heads[n].parameters(), lr=args.lr,
                                                         weight_decay=args.weight_decay) for n in others}}
    starts = {head_name: start_epoch, **{n: args.start_epoch for n in others}}
    if resume_state is not None:
        saved = resume_state.get("feature_heads")
        for n in others:
            entry = saved.get(n) if isinstance(saved, Mapping) else None
            if isinstance(entry, Mapping) and "head" in entry:
                heads[n].load_state_dict(entry["head"])
                if start is not None and "optimizer" in entry and "epoch" in entry:
                    optimizers[n].load_state_dict(entry["optimizer"])
                    starts[n] = int(entry["epoch"]) + 1
        saved_lrs = resume_state.get("lr_search")
        if lr_search and isinstance(saved_lrs, Mapping) and set(saved_lrs) == set(names):
            searched = {n: float(v) for n, v in saved_lrs.items()}
            log.info("lr search: the checkpoint's choice, %s", searched)
        if rt.is_main and resume_state.get("log_stats"):
            run_log.write_epoch(resume_state["log_stats"])
    _broadcast(model)
    record_args(args, rt.is_main, args.output_dir)
    restore_missing_checkpoint(args, rt, resume_state)

    loaders = [data.build_loader(s, args.batch_size, train=False, num_workers=args.num_workers, pin_memory=pin)
               for s in (train_set, val_set)]
    t0 = time.time()
    (train_feats, train_labels), (val_feats, val_labels) = [
        extract_named_features(extractor, loader, rt.device, rt.autocast, compile_forward=args.compile,
                               print_freq=args.print_freq)
        for loader in loaders]
    log.info("cached features (%s, one pass): train %s, val %s in %.1f s", ", ".join(names),
             tuple(train_feats[head_name].shape), tuple(val_feats[head_name].shape), time.time() - t0)
    knn = {n: knn_accuracy(train_feats[n], train_labels, val_feats[n], val_labels, k=KNN_K,
                           temperature=KNN_TEMPERATURE, num_classes=args.nb_classes) for n in names}
    for n in names:
        log.info("weighted %d-NN (T=%g), %s: top-1 %.2f%%, top-5 %.2f%%", KNN_K, KNN_TEMPERATURE, n,
                 knn[n]["acc1"] * 100, knn[n]["acc5"] * 100)

    batch = args.batch_size * args.accum_iter * rt.world_size
    schedule = dict(epochs=args.epochs, batch_size=batch, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                    seed=args.seed)
    lrs = {n: args.lr for n in names}
    if lr_search:
        if searched is None:
            searched = {n: search_lr(fresh, train_feats[n], train_labels, base_lr=args.lr, factors=factors,
                                     weight_decay=args.weight_decay, **schedule)[0] for n in names}
            log.info("lr search (held-out %d%% of train, lr %.3e x %s): picked %s", round(HELD_OUT_FRACTION * 100),
                     args.lr, factors, searched)
        lrs = searched
        for n in names:
            if lrs[n] in (args.lr * min(factors), args.lr * max(factors)) and len(factors) > 1:
                log.warning("lr search, %s: picked %g, an edge of the grid (lr x %s): widen --lr_factors", n,
                            lrs[n], factors)
    baseline_stats: dict[str, float] = {}
    if getattr(args, "baselines", False):
        baseline_stats = _linprobe_baselines(args, rt, train_set, val_set, pin, batch, lr_search)
    constant_line = {
        **percent({"test_knn_acc1": knn[head_name]["acc1"], "test_knn_acc5": knn[head_name]["acc5"],
                    **{f"knn_{m}_{n}": knn[n][m] for n in names for m in ("acc1", "acc5")}, **baseline_stats}),
        "probe_lr": lrs[head_name], **{f"probe_lr_{n}": lrs[n] for n in names},
        "feature": head_name, "features": list(names), "features_unavailable": missing,
    }

    def train_other(n: str, epoch: int) -> None:
        train_head_epoch(heads[n], train_feats[n], train_labels, optimizers[n], epoch=epoch, lr=lrs[n], **schedule)

    for n in others:
        if starts[n] < start_epoch:
            log.info("the checkpoint holds no %s head at epoch %d: training it for epochs %d..%d",
                     n, start_epoch - 1, starts[n], start_epoch - 1)
        for epoch in range(starts[n], start_epoch):
            train_other(n, epoch)
    other_val: dict[str, dict[str, float]] = {}

    def on_epoch_end(epoch: int, train_stats: dict, val_stats: dict) -> None:
        nonlocal max_acc1
        for n in others:
            train_other(n, epoch)
            other_val[n] = evaluate_head(heads[n], val_feats[n], val_labels)
        by_name = {head_name: val_stats, **other_val}
        max_acc1 = max(max_acc1, val_stats["acc1"])
        line = {**{f"train_{k}": v for k, v in train_stats.items()},
                **percent({f"test_{k}": v for k, v in val_stats.items()}),
                **percent({f"test_{m}_{n}": by_name[n][m] for n in names for m in ("acc1", "acc5")}),
                **constant_line, "epoch": epoch, "n_parameters": n_parameters}
        if args.output_dir and rt.is_main:
            state = ckpt.training_state(
                model, optimizer, epoch, args=args, model_args=model_args, log_stats=line, max_accuracy=max_acc1,
                feature_heads={n: {"head": heads[n].state_dict(), "optimizer": optimizers[n].state_dict(),
                                   "epoch": epoch} for n in others},
                feature_norms={"final_norm": norm_state(final_norm), "fc_norm": norm_state(fc_norm)},
                lr_search=dict(lrs) if lr_search else None)
            save_checkpoint(args.output_dir, state, epoch, args.save_freq, last=epoch + 1 == args.epochs)
        run_log.write_epoch(line)
        run_log.scalars({f"perf/test_{k}": v for k, v in percent(val_stats).items()}, epoch)
        run_log.scalars({f"perf/test_acc1_{n}": by_name[n]["acc1"] * 100 for n in names}, epoch)
        log.info("epoch %d: train loss %.4f, val top-1 %.2f%% (max %.2f%%); %s", epoch, train_stats["loss"],
                 val_stats["acc1"] * 100, max_acc1 * 100,
                 ", ".join(f"{n} {by_name[n]['acc1'] * 100:.2f}%" for n in names))

    result = train_linear_head(
        model.head, train_feats[head_name], train_labels, epochs=args.epochs, batch_size=batch, lr=lrs[head_name],
        min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, optimizer=optimizer, start_epoch=start_epoch,
        seed=args.seed, val_feats=val_feats[head_name], val_labels=val_labels, on_epoch_end=on_epoch_end,
    )
    for n in others:
        if n not in other_val:  # no epoch left to train: the head as it is
            other_val[n] = evaluate_head(heads[n], val_feats[n], val_labels)
    by_name = {head_name: result, **other_val}
    max_acc1 = max(max_acc1, result["acc1"])
    log.info("Accuracy of the network on the %d test images: %.1f%%", len(val_set), result["acc1"] * 100)
    log.info("Max accuracy: %.2f%%", max_acc1 * 100)
    run_log.close()
    return {**result, "max_acc1": max_acc1, "knn_acc1": knn[head_name]["acc1"], "knn_acc5": knn[head_name]["acc5"],
            **{f"test_{m}_{n}": by_name[n][m] for n in names for m in ("acc1", "acc5")},
            **{f"knn_{m}_{n}": knn[n][m] for n in names for m in ("acc1", "acc5")},
            "probe_lr": lrs[head_name], **{f"probe_lr_{n}": lrs[n] for n in names}, **baseline_stats,
            "feature": head_name, "features": list(names), "features_unavailable": missing,
            "wall_time_s": time.time() - t0}


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
