"""What the linear-probe and fine-tune runs share (`umae_plugin.linprobe`, `umae_plugin.finetune`):
the flag checks common to both, the geometry and encoder a checkpoint was trained with, resuming,
the run's prologue (runtime, model name, checkpoints to read), the reference epoch loop (`fit`) and
`--eval` (`evaluate_only`).

Reads the argument namespace here, once, and hands explicit values to the data, model, optimiser,
engine (`engine_classify`) and checkpoint modules. Both runs resume from their own output folder
with `--resume auto`. Returned accuracies are fractions in [0, 1]; `log.txt` and the printed lines
keep the reference scripts' percentages (`test_acc1: 75.3`).
"""
from __future__ import annotations

import argparse
import contextlib
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
from . import data, distributed, run_folder
from .engine_classify import evaluate, train_one_epoch
from .errors import UsageError, UserError
from .logger import RunLog
from .registry import create_model, list_models, parse_model_name
from .runtime import Runtime, get_rng_state, record_args, set_rng_state, setup_runtime

log = logging.getLogger("umae")

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


def restore_missing_checkpoint(args: argparse.Namespace, rt: Runtime, resume_state: Mapping | None) -> None:
    """On resume, rank 0: the resumed epoch's numbered checkpoint, when due and lost to a kill."""
    if resume_state is not None and rt.is_main and args.output_dir:
        ckpt.restore_missing_checkpoint(args.output_dir, resume_state, args.save_freq, args.epochs, args.resume)


# ---------------------------------------------------------------------------------------------
# shared pieces


def percent(stats: Mapping[str, float]) -> dict[str, float]:
    """Accuracies as the reference logs them (percent); other values unchanged."""
    return {k: v * 100 if "acc" in k else v for k, v in stats.items()}


def resolve_num_classes(args: argparse.Namespace, train_set: Dataset | None, val_set: Dataset) -> None:
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


def prologue(args: argparse.Namespace, mode: str) -> tuple[Runtime, str, Mapping | None, Mapping | None]:
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


def claim_output_folder(run: contextlib.ExitStack | None, args: argparse.Namespace, rt: Runtime) -> None:
    """Once the flags and the data are checked, before anything is written: the output folder
    becomes this run's alone, held by `run` to its end (`--eval` writes nothing and takes none)."""
    if run is not None and not args.eval:
        run.enter_context(run_folder.claim(args.output_dir, enabled=rt.is_main))


def finish(result: dict[str, Any]) -> dict[str, Any]:
    distributed.shutdown()
    return result


def create_classifier(name: str, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
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


def evaluate_only(
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


def fit(
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
    restore_missing_checkpoint(args, rt, resume_state)

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
                **percent({f"test_{k}": v for k, v in test_stats.items()}),
                "epoch": epoch, "n_parameters": n_parameters}
        if args.output_dir and rt.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "scaler": scaler.state_dict() if scaler is not None else None, "args": args,
                     "log_stats": line, "max_accuracy": max_acc1, "rng": get_rng_state(device)}
            save_checkpoint(args.output_dir, state, epoch, args.save_freq, last=epoch + 1 == args.epochs)
        run_log.write_epoch(line)
        run_log.scalars({f"perf/test_{k}": v for k, v in percent(test_stats).items()}, epoch)
        log.info("Accuracy of the network on the %d test images: %.1f%%", len(val_set), test_stats["acc1"] * 100)
        log.info("Max accuracy: %.2f%%", max_acc1 * 100)
        result = {**test_stats, "max_acc1": max_acc1, "train_loss": train_stats["loss"], "epoch": epoch}
    if not result:  # nothing left to train (resumed at the end): report the model as it is
        result = {**evaluate(train_model, val_loader, device, rt.autocast), "max_acc1": max_acc1}
    result["wall_time_s"] = time.time() - start
    log.info("Training time %.1f s", result["wall_time_s"])
    run_log.close()
    return result
