"""Linear-probe and fine-tune runs: what `main_linprobe.py` and `main_finetune.py` call once their
arguments are parsed.

Reads the argument namespace here, once, and hands explicit values to the data, model, optimiser,
engine (`engine_classify`, `linprobe_cached`) and checkpoint modules. Both runs resume from their
own output folder with `--resume auto`. Returned accuracies are fractions in [0, 1]; `log.txt`
and the printed lines keep the reference scripts' percentages (`test_acc1: 75.3`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from . import checkpoint as ckpt
from . import baselines, data, distributed, run_folder
from .engine_classify import evaluate, train_one_epoch
from .errors import UsageError, UserError
from .linprobe_cached import (HELD_OUT_FRACTION, LR_FACTORS, POOLS, evaluate_head, extract_pooled_features,
                              knn_accuracy, search_lr, train_head_epoch, train_linear_head)
from .logger import RunLog
from .optim import build_lars, param_groups_layer_decay, resolve_lr
from .runtime import get_rng_state, set_rng_state
from .registry import create_model, list_models, parse_model_name
from .runtime import Runtime, record_args, setup_runtime

log = logging.getLogger("umae")

KNN_K, KNN_TEMPERATURE = 20, 0.07
MIXUP_MODES = ("batch", "pair", "elem")


class ConfigError(UsageError):
    """A flag value, or combination of flags, that cannot work; the message names the flag."""



# ---------------------------------------------------------------------------------------------
# arguments


def classifier_name(model: str) -> str:
    """The classifier for `--model`: `vit_*` as given; the pre-training names `mae_vit_*` /
    `umae_vit_*` (also the reference's `mae_vit_*_dec512d8b`) and `simmim_vit_*` / `usimmim_vit_*`
    map to the `vit_*` of the same encoder (`registry.parse_model_name`)."""
    try:
        name = parse_model_name(model).arch
    except ValueError:
        name = model
    if name not in list_models("vit_"):
        raise ConfigError(f"--model {model}: no classifier named {name!r}; known: {', '.join(list_models('vit_'))}")
    return name


def check_args(args: argparse.Namespace, mode: str) -> argparse.Namespace:
    """Refuse values that cannot work (`mode`: "linprobe" or "finetune"); raises `ConfigError`."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name in ("batch_size", "accum_iter", "save_freq", "print_freq", "nb_classes"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("epochs", "start_epoch", "warmup_epochs", "min_lr", "weight_decay", "num_workers"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.lr is None:
        need(args.blr > 0, f"--blr must be > 0, got {args.blr}")
    else:
        need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    for name in ("input_size", "patch_size"):
        value = getattr(args, name)
        need(value is None or value >= 1, f"--{name} must be >= 1, got {value}")
    if args.input_size and args.patch_size:
        need(args.input_size % args.patch_size == 0,
             f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    if args.finetune and not args.eval:
        need(Path(args.finetune).is_file(), f"--finetune {args.finetune}: no such checkpoint file")
    if args.resume not in ("", "auto"):
        need(Path(args.resume).is_file(), f"--resume {args.resume}: no such checkpoint file")
    classifier_name(args.model)
    if mode == "finetune":
        need(args.layer_decay > 0, f"--layer_decay must be > 0, got {args.layer_decay}")
        need(0 <= args.drop_path < 1, f"--drop_path must be in [0, 1), got {args.drop_path}")
        need(0 <= args.smoothing < 1, f"--smoothing must be in [0, 1), got {args.smoothing}")
        need(args.clip_grad is None or args.clip_grad > 0, f"--clip_grad must be > 0, got {args.clip_grad}")
        need(0 <= args.reprob <= 1, f"--reprob must be in [0, 1], got {args.reprob}")
        need(args.mixup >= 0 and args.cutmix >= 0, f"--mixup / --cutmix must be >= 0, got {args.mixup} / {args.cutmix}")
        need(0 <= args.mixup_prob <= 1 and 0 <= args.mixup_switch_prob <= 1,
             "--mixup_prob and --mixup_switch_prob must be in [0, 1]")
        need(args.mixup_mode in MIXUP_MODES, f"--mixup_mode must be one of {MIXUP_MODES}, got {args.mixup_mode!r}")
        need(args.cutmix_minmax is None or len(args.cutmix_minmax) == 2,
             f"--cutmix_minmax takes two values (min max), got {args.cutmix_minmax}")
        need(not mixup_active(args) or args.batch_size % 2 == 0,
             f"mixup / cutmix needs an even --batch_size, got {args.batch_size}")
    return args


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# ---------------------------------------------------------------------------------------------
# checkpoints and geometry


ENCODER_OVERRIDES = ("embed_dim", "depth", "num_heads")


def _saved_args(source: Mapping[str, Any]) -> Mapping[str, Any]:
    saved = source.get("args") if isinstance(source, Mapping) else None
    return vars(saved) if isinstance(saved, argparse.Namespace) else saved if isinstance(saved, Mapping) else {}


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def checkpoint_geometry(source: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(input size, patch size) a checkpoint was trained at: from its saved `args` when they hold
    `input_size` / `patch_size`, else from the weights (patch: the patch-embedding kernel; input:
    sqrt(position-embedding tokens - 1) * patch). None where neither says."""
    saved = _saved_args(source)
    input_size, patch_size = _positive_int(saved.get("input_size")), _positive_int(saved.get("patch_size"))
    if input_size is None or patch_size is None:
        try:
            state = ckpt.extract_state_dict(source)
        except ValueError:
            return input_size, patch_size
        kernel = state.get("patch_embed.proj.weight")
        table = state.get("pos_embed")
        weight_patch = int(kernel.shape[-1]) if kernel is not None else None
        patch_size = patch_size or weight_patch
        if input_size is None and table is not None and weight_patch:
            side = math.isqrt(table.shape[1] - 1)
            if side * side == table.shape[1] - 1:
                input_size = side * weight_patch
    return input_size, patch_size


def checkpoint_encoder_overrides(source: Mapping[str, Any]) -> dict[str, int]:
    """The encoder overrides (`embed_dim`, `depth`, `num_heads`) a checkpoint's saved `args`
    record (`main_pretrain.py --embed_dim ...`, and these scripts' own checkpoints); {} for
    released checkpoints, whose architecture is the one `--model` names."""
    saved = _saved_args(source)
    return {k: saved[k] for k in ENCODER_OVERRIDES if _positive_int(saved.get(k)) is not None}


def resume_path(resume: str, output_dir: str | None) -> Path | None:
    """`checkpoint.resolve_resume`, with a missing file reported as a configuration error."""
    try:
        return ckpt.resolve_resume(resume, output_dir)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None


def load_resume_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> int | None:
    """Restore a checkpoint written by these runs: the model always (strict); with `optimizer`
    (training, not `--eval`) also the optimizer, scaler and random state. Returns the epoch to
    start at (saved epoch + 1), or None when only the model was restored."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise UserError(f"--resume: the checkpoint does not hold this classifier "
                        f"({type(err).__name__}: {ckpt.first_line(err)})") from err
    if optimizer is None or "optimizer" not in state or "epoch" not in state:
        return None
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if distributed.get_world_size() == 1:
        set_rng_state(state.get("rng"))
    return int(state["epoch"]) + 1


def save_checkpoint(output_dir: str, state: dict[str, Any], epoch: int, save_freq: int, last: bool) -> None:
    """`checkpoint-last.pth` every epoch; `checkpoint-{epoch}.pth` every `save_freq` epochs and at
    the last one. Atomic writes: a kill leaves the previous file intact (`checkpoint.save_checkpoint`,
    shared with pre-training)."""
    ckpt.save_checkpoint(output_dir, state, epoch, save_freq, last)


def _restore_missing_checkpoint(args: argparse.Namespace, rt: Runtime, resume_state: Mapping | None) -> None:
    """On resume, rank 0: the resumed epoch's numbered checkpoint, when due and lost to a kill."""
    if resume_state is not None and rt.is_main and args.output_dir:
        ckpt.restore_missing_checkpoint(args.output_dir, resume_state, args.save_freq, args.epochs, args.resume)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _percent(stats: Mapping[str, float]) -> dict[str, float]:
    """Accuracies as the reference logs them (percent); other values unchanged."""
    return {k: v * 100 if "acc" in k else v for k, v in stats.items()}


def _num_classes(args: argparse.Namespace, train_set: Dataset | None, val_set: Dataset) -> None:
    """Check `--nb_classes` against the data: digits / cifar10 take the dataset's count (with a
    warning when the flag differs); an image folder must not have more classes than the flag,
    and its train and val splits must name the same classes (else labels would shift)."""
    found = data.num_classes(train_set if train_set is not None else val_set)
    if args.dataset != "imagefolder":
        if args.nb_classes != found:
            log.warning("--nb_classes %d ignored: dataset %s has %d classes", args.nb_classes, args.dataset, found)
            args.nb_classes = found
        return
    if train_set is not None and train_set.classes != val_set.classes:
        raise ConfigError(f"{args.data_path}: train/ and val/ hold different class folders "
                          f"({len(train_set.classes)} vs {len(val_set.classes)} classes)")
    if found > args.nb_classes:
        raise ConfigError(f"{args.data_path} has {found} classes but --nb_classes is {args.nb_classes}")
    if found < args.nb_classes:
        log.warning("%s has %d classes; the head keeps --nb_classes %d outputs", args.data_path, found, args.nb_classes)


def _val_loader(dataset: Dataset, args: argparse.Namespace, pin_memory: bool) -> DataLoader:
    """Sharded across processes with `--dist_eval`; otherwise every process reads all of val
    (as the reference does without `--dist_eval`)."""
    if args.dist_eval or distributed.get_world_size() == 1:
        if args.dist_eval and len(dataset) % distributed.get_world_size():
            log.warning("--dist_eval with %d val images over %d processes: a few are counted twice",
                        len(dataset), distributed.get_world_size())
        return data.build_loader(dataset, args.batch_size, train=False, num_workers=args.num_workers,
                                 pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=SequentialSampler(dataset),
                      num_workers=args.num_workers, pin_memory=pin_memory, drop_last=False)


def _prologue(args: argparse.Namespace, mode: str) -> tuple[Runtime, str, Mapping | None, Mapping | None]:
    """Checks, runtime, model name, and the checkpoints to read: (runtime, classifier name,
    --resume state, --finetune content)."""
    check_args(args, mode)
    rt = setup_runtime(args.device, args.seed, args.amp,
                       dist_url=args.dist_url, world_size=args.world_size, dist_on_itp=args.dist_on_itp)
    name = classifier_name(args.model)
    path = resume_path(args.resume, args.output_dir)
    resume_state = ckpt.read_checkpoint(path, "--resume") if path is not None else None
    if resume_state is not None:
        log.info("resuming from %s", path)
    source = ckpt.read_checkpoint(args.finetune, "--finetune", mmap=True) if args.finetune and not args.eval else None
    geometry_from = resume_state if resume_state is not None else source
    input_size, patch_size = checkpoint_geometry(geometry_from) if geometry_from is not None else (None, None)
    if args.input_size is None:
        args.input_size = input_size or 224
    if args.patch_size is None:
        args.patch_size = patch_size  # None: the architecture's own
    if args.patch_size and args.input_size % args.patch_size:
        raise ConfigError(f"--input_size {args.input_size} is not a multiple of the patch size {args.patch_size}")
    overrides = checkpoint_encoder_overrides(geometry_from) if geometry_from is not None else {}
    for key in ENCODER_OVERRIDES:  # recorded in args, so this run's checkpoints rebuild the same encoder
        setattr(args, key, overrides.get(key))
    if overrides:
        log.info("encoder overrides from the checkpoint's args: %s", overrides)
    return rt, name, resume_state, source


def _claim_output_folder(run: contextlib.ExitStack | None, args: argparse.Namespace, rt: Runtime) -> None:
    """Once the flags and the data are checked, before anything is written: the output folder
    becomes this run's alone, held by `run` to its end (`--eval` writes nothing and takes none)."""
    if run is not None and not args.eval:
        run.enter_context(run_folder.claim(args.output_dir, enabled=rt.is_main))


def _finish(result: dict[str, Any]) -> dict[str, Any]:
    distributed.shutdown()
    return result


def _create(name: str, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """The classifier `name` at the resolved input / patch size, with any encoder overrides."""
    for key in ("patch_size", *ENCODER_OVERRIDES):
        if getattr(args, key, None):
            kwargs[key] = getattr(args, key)
    model = create_model(name, num_classes=args.nb_classes, global_pool=args.global_pool, img_size=args.input_size, **kwargs)
    args.patch_size = model.patch_embed.patch_size[0]
    return model


def _scaler(rt: Runtime) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None


def _wrap(model: nn.Module, rt: Runtime, compile_model: bool) -> nn.Module:
    if rt.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def _evaluate_only(
    model: nn.Module, val_set: Dataset, args: argparse.Namespace, rt: Runtime, resume_state: Mapping | None
) -> dict[str, float]:
    """`--eval`: the `--resume` checkpoint's accuracy on val, nothing written."""
    record_args(args, rt.is_main)
    if resume_state is not None:
        load_resume_state(resume_state, model)
    else:
        log.warning("--eval without a --resume checkpoint: evaluating a classifier whose head is untrained")
    pin = args.pin_mem and rt.device.type == "cuda"
    eval_model = torch.compile(model) if args.compile else model
    stats = evaluate(eval_model, _val_loader(val_set, args, pin), rt.device, rt.autocast)
    log.info("Accuracy of the network on the %d test images: %.1f%%", len(val_set), stats["acc1"] * 100)
    return stats


def _fit(
    args: argparse.Namespace,
    rt: Runtime,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Dataset,
    val_set: Dataset,
    resume_state: Mapping | None,
    n_parameters: int,
    *,
    mixup_fn: Callable | None = None,
    clip_grad: float | None = None,
) -> dict[str, Any]:
    """The reference epoch loop: train, evaluate, checkpoint, one log line; returns the last
    epoch's val accuracy (fractions), `max_acc1` and the training loss."""
    device = rt.device
    pin = args.pin_mem and device.type == "cuda"
    scaler = _scaler(rt)
    start_epoch, max_acc1 = args.start_epoch, 0.0
    run_log = RunLog(args.output_dir or None, args.log_dir or None, enabled=rt.is_main)
    if resume_state is not None:
        start = load_resume_state(resume_state, model, optimizer, scaler)
        start_epoch = start if start is not None else start_epoch
        max_acc1 = float(resume_state.get("max_accuracy", 0.0))
        if rt.is_main and resume_state.get("log_stats"):
            run_log.write_epoch(resume_state["log_stats"])  # the line a kill after the checkpoint may have lost
    record_args(args, rt.is_main, args.output_dir)
    _restore_missing_checkpoint(args, rt, resume_state)

    train_loader = data.build_loader(train_set, args.batch_size, train=True, num_workers=args.num_workers,
                                     pin_memory=pin, seed=args.seed)
    val_loader = _val_loader(val_set, args, pin)
    train_model = _wrap(model, rt, args.compile)
    log.info("training epochs %d..%d", start_epoch, args.epochs - 1)

    result: dict[str, Any] = {}
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(train_loader, epoch)
        train_stats = train_one_epoch(
            train_model, criterion, train_loader, optimizer, device=device, epoch=epoch, lr=args.lr,
            min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs, autocast=rt.autocast,
            scaler=scaler, accum_iter=args.accum_iter, clip_grad=clip_grad, mixup_fn=mixup_fn,
            print_freq=args.print_freq, run_log=run_log,
        )
        test_stats = evaluate(train_model, val_loader, device, rt.autocast)
        max_acc1 = max(max_acc1, test_stats["acc1"])
        line = {**{f"train_{k}": v for k, v in train_stats.items()},
                **_percent({f"test_{k}": v for k, v in test_stats.items()}),
                "epoch": epoch, "n_parameters": n_parameters}
        if args.output_dir and rt.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "scaler": scaler.state_dict() if scaler is not None else None, "args": args,
                     "log_stats": line, "max_accuracy": max_acc1, "rng": get_rng_state(device)}
            save_checkpoint(args.output_dir, state, epoch, args.save_freq, last=epoch + 1 == args.epochs)
        run_log.write_epoch(line)
        run_log.scalars({f"perf/test_{k}": v for k, v in _percent(test_stats).items()}, epoch)
        log.info("Accuracy of the network on the %d test images: %.1f%%", len(val_set), test_stats["acc1"] * 100)
        log.info("Max accuracy: %.2f%%", max_acc1 * 100)
        result = {**test_stats, "max_acc1": max_acc1, "train_loss": train_stats["loss"], "epoch": epoch}
    if not result:  # nothing left to train (resumed at the end): report the model as it is
        result = {**evaluate(train_model, val_loader, device, rt.autocast), "max_acc1": max_acc1}
    result["wall_time_s"] = time.time() - start
    log.info("Training time %.1f s", result["wall_time_s"])
    run_log.close()
    return result


# ---------------------------------------------------------------------------------------------
# linear probing


def build_linprobe_model(name: str, args: argparse.Namespace, source: Mapping | None) -> nn.Module:
    """The reference probe: the classifier with `source`'s encoder, head weight trunc-normal(0.01)
    and bias 0, the head behind a BatchNorm without affine parameters, all else frozen."""
    model = _create(name, args)
    if source is not None:
        log.info("loading the encoder of --finetune %s", args.finetune)
        ckpt.load_pretrained(model, source, f"--finetune {args.finetune}")  # logs loaded / fresh / ignored keys
    nn.init.trunc_normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
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
    with contextlib.ExitStack() as run:  # holds the output folder's lock (`_claim_output_folder`)
        return _finish(_run_linprobe(args, run))


def check_linprobe_flags(args: argparse.Namespace) -> None:
    """`--lr_search` and `--baselines` work on cached features only; raises `ConfigError`."""
    for flag in ("lr_search", "baselines"):
        if getattr(args, flag, False) and not args.cache_features:
            raise ConfigError(f"--{flag} needs --cache_features (it works on features extracted once)")


def _run_linprobe(args: argparse.Namespace, run: contextlib.ExitStack | None = None) -> dict[str, Any]:
    check_linprobe_flags(args)
    rt, name, resume_state, source = _prologue(args, "linprobe")
    cached = args.cache_features and not args.eval
    train_tf = data.eval_transform(args.input_size) if cached else data.linprobe_transform(args.input_size, True)
    # Data first: a wrong path fails before anything expensive is built.
    train_set = None if args.eval else data.build_dataset(args.dataset, args.data_path, "train", train_tf, args.download)
    if train_set is not None and not cached:  # the cached probe trains on all features if fewer than a batch
        data.require_full_batch(train_set, args.batch_size, rt.world_size)
    val_set = data.build_dataset(args.dataset, args.data_path, "val", data.linprobe_transform(args.input_size, False),
                                 args.download)
    _num_classes(args, train_set, val_set)
    _claim_output_folder(run, args, rt)

    model = build_linprobe_model(name, args, source).to(rt.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args.lr = resolve_lr(args.lr, args.blr, args.batch_size, args.accum_iter, rt.world_size)
    log.info("model %s, input %d px, patch %d: %d trainable parameters; effective batch %d, lr %.3e (blr %.3e)",
             name, args.input_size, args.patch_size, n_parameters,
             args.batch_size * args.accum_iter * rt.world_size, args.lr, args.blr)
    optimizer = build_lars(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    pin = args.pin_mem and rt.device.type == "cuda"

    if args.eval:
        return _evaluate_only(model, val_set, args, rt, resume_state)
    if cached:
        return _linprobe_cached(args, rt, model, optimizer, train_set, val_set, resume_state, n_parameters, pin)
    return _fit(args, rt, model, nn.CrossEntropyLoss(), optimizer, train_set, val_set, resume_state, n_parameters)


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
        start = load_resume_state(resume_state, model, optimizer)
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
    _restore_missing_checkpoint(args, rt, resume_state)

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
        **_percent({"test_knn_acc1": knn[pool]["acc1"], "test_knn_acc5": knn[pool]["acc5"],
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
                **_percent({f"test_{k}": v for k, v in val_stats.items()}),
                **_percent({f"test_{m}_{p}": by_pool[p][m] for p in POOLS for m in ("acc1", "acc5")}),
                **constant_line, "epoch": epoch, "n_parameters": n_parameters}
        if args.output_dir and rt.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "scaler": None, "args": args, "log_stats": line, "max_accuracy": max_acc1,
                     "other_pool": {"pool": other, "head": other_head.state_dict(),
                                    "optimizer": other_optimizer.state_dict(), "epoch": epoch},
                     "lr_search": dict(lrs) if lr_search else None}
            save_checkpoint(args.output_dir, state, epoch, args.save_freq, last=epoch + 1 == args.epochs)
        run_log.write_epoch(line)
        run_log.scalars({f"perf/test_{k}": v for k, v in _percent(val_stats).items()}, epoch)
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
        lambda: _create(name, args), train_set, val_set, num_classes=args.nb_classes, epochs=args.epochs,
        batch_size=batch, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay, seed=args.seed, lr_search=lr_search, device=rt.device, autocast=rt.autocast,
        loader_batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin, print_freq=args.print_freq,
        k=KNN_K, temperature=KNN_TEMPERATURE))
    log.info("baselines in %.1f s: %s", time.time() - start,
             ", ".join(f"{k} {v * 100:.2f}%" if "acc" in k else f"{k} {v:.3g}" for k, v in stats.items()))
    return stats


# ---------------------------------------------------------------------------------------------
# fine-tuning


def build_finetune_model(name: str, args: argparse.Namespace, source: Mapping | None) -> nn.Module:
    """The classifier with drop path and `source`'s encoder; a freshly initialised head gets the
    reference's trunc-normal(2e-5) weights."""
    model = _create(name, args, drop_path_rate=args.drop_path)
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
    with contextlib.ExitStack() as run:  # holds the output folder's lock (`_claim_output_folder`)
        return _finish(_run_finetune(args, run))


def _run_finetune(args: argparse.Namespace, run: contextlib.ExitStack | None = None) -> dict[str, Any]:
    rt, name, resume_state, source = _prologue(args, "finetune")
    train_set = None
    if not args.eval:
        train_tf = data.finetune_transform(args.input_size, True, color_jitter=args.color_jitter, aa=args.aa,
                                           reprob=args.reprob, remode=args.remode, recount=args.recount)
        train_set = data.build_dataset(args.dataset, args.data_path, "train", train_tf, args.download)
        data.require_full_batch(train_set, args.batch_size, rt.world_size)
    val_set = data.build_dataset(args.dataset, args.data_path, "val", data.finetune_transform(args.input_size, False),
                                 args.download)
    _num_classes(args, train_set, val_set)
    _claim_output_folder(run, args, rt)

    mixup_fn = None
    if mixup_active(args):
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        log.info("mixup / cutmix on: mixup %g, cutmix %g, mode %s", args.mixup, args.cutmix, args.mixup_mode)

    model = build_finetune_model(name, args, source).to(rt.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args.lr = resolve_lr(args.lr, args.blr, args.batch_size, args.accum_iter, rt.world_size)
    log.info("model %s, input %d px, patch %d: %.2fM parameters; effective batch %d, lr %.3e (blr %.3e)",
             name, args.input_size, args.patch_size, n_parameters / 1e6,
             args.batch_size * args.accum_iter * rt.world_size, args.lr, args.blr)
    groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay,
                                      no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr)

    if args.eval:
        return _evaluate_only(model, val_set, args, rt, resume_state)
    return _fit(args, rt, model, build_criterion(args), optimizer, train_set, val_set, resume_state, n_parameters,
                mixup_fn=mixup_fn, clip_grad=args.clip_grad)
