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
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from . import checkpoint as ckpt
from . import data, distributed, run_folder
from .engine_classify import evaluate, train_one_epoch
from .errors import UsageError
from .logger import RunLog
from .registry import create_model, list_models, parse_model_name, resolved_kwargs
from .runtime import Runtime, record_args, setup_runtime

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
        need(Path(args.finetune).exists(), f"--finetune {args.finetune}: no such checkpoint file or folder")
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
    seed: int = 0,
) -> int | None:
    """Restore a checkpoint written by these runs (`checkpoint.restore_training_state`, as
    pre-training does): the model always (strict); with `optimizer` (training, not `--eval`) also
    the optimizer, scaler and random state. Returns the epoch to start at (saved epoch + 1), or
    None when only the model was restored."""
    return ckpt.restore_training_state(state, model, optimizer, scaler, seed=seed)


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


def prologue(args: argparse.Namespace, mode: str, parser: argparse.ArgumentParser
             ) -> tuple[Runtime, str, Mapping | None, Mapping | None]:
    """Checks, runtime, model name, and the checkpoints to read: (runtime, classifier name,
    --resume state, --finetune content). `parser`: the script's, whose defaults tell the flags
    left unset (`adopt_resume_model`). Input and patch size come from the checkpoint's model
    (`checkpoint.checkpoint_model_args`: its record, else read off its weights, which decide the
    patch grid) unless the flags give them; the encoder sizes as `_encoder` says."""
    check_args(args, mode)
    rt = setup_runtime(args.device, args.seed, args.amp,
                       dist_url=args.dist_url, world_size=args.world_size, dist_on_itp=args.dist_on_itp)
    path = resume_path(args.resume, args.output_dir)
    resume_state = ckpt.read_checkpoint(path, "--resume") if path is not None else None
    if resume_state is not None:
        log.info("resuming from %s", path)
        adopt_resume_model(args, parser, path, resume_state)
    name = classifier_name(args.model)
    source = ckpt.read_checkpoint(args.finetune, "--finetune", mmap=True) if args.finetune and not args.eval else None
    geometry_from = resume_state if resume_state is not None else source
    record = _model_args(geometry_from) if geometry_from is not None else None
    kwargs = record["kwargs"] if record is not None else {}
    if args.input_size is None:
        args.input_size = kwargs.get("img_size") or 224
    if args.patch_size is None:
        args.patch_size = kwargs.get("patch_size")  # None: the architecture's own
    if args.patch_size and args.input_size % args.patch_size:
        raise ConfigError(f"--input_size {args.input_size} is not a multiple of the patch size {args.patch_size}")
    encoder = _encoder(geometry_from, record, name, resumed=resume_state is not None)
    for key in ENCODER_OVERRIDES:  # recorded in args, so this run's checkpoints rebuild the same encoder
        setattr(args, key, encoder.get(key))
    if encoder:
        log.info("encoder from the checkpoint: %s", encoder)
    return rt, name, resume_state, source


def _model_args(source: Mapping[str, Any]) -> dict[str, Any] | None:
    """`checkpoint.checkpoint_model_args`, or None for a file it cannot read a model from (the load
    then says what does not fit)."""
    try:
        return ckpt.checkpoint_model_args(source)
    except (ValueError, TypeError) as err:
        log.warning("cannot read the checkpoint's model (%s): geometry and encoder from the flags", err)
        return None


def _encoder(source: Mapping[str, Any] | None, record: Mapping[str, Any] | None, name: str,
             resumed: bool) -> dict[str, int]:
    """The encoder sizes (`embed_dim`, `depth`, `num_heads`) to build `name` with: a resumed run's
    checkpoint's (its own model), a --finetune file's stored record of the same encoder, else the
    sizes its stored args name (`main_pretrain.py --embed_dim ...`); {} for released checkpoints,
    whose architecture is the one `--model` names (heads change no weight shape: never guessed)."""
    if record is None or source is None:
        return {}
    if resumed or (source.get(ckpt.MODEL_ARGS_KEY) is not None and _same_classifier(record["name"], name)):
        return {k: record["kwargs"][k] for k in ENCODER_OVERRIDES if k in record["kwargs"]}
    saved = ckpt.stored_args(source) or {}
    return {k: saved[k] for k in ENCODER_OVERRIDES
            if isinstance(saved.get(k), int) and not isinstance(saved.get(k), bool) and saved[k] > 0}


def _same_classifier(a: str, b: str) -> bool:
    """Whether model names `a` and `b` have the same encoder (`mae_vit_x` and `vit_x` do)."""
    try:
        return parse_model_name(a).arch == parse_model_name(b).arch
    except ValueError:
        return a == b


def adopt_resume_model(args: argparse.Namespace, parser: argparse.ArgumentParser, path: Path,
                       state: Mapping[str, Any]) -> None:
    """On `--resume`: `--model` (its encoder), `--input_size`, `--patch_size`, `--nb_classes`
    (image folders; digits / cifar10 take the dataset's) and `--global_pool` / `--cls_token`
    against the checkpoint's "model_args" (`checkpoint.reconcile_resume_flags`): contradicted, the
    run is refused (exit 2); left at their defaults, they take the checkpoint's values."""
    record = _model_args(state)
    if record is None:
        return
    kwargs = record["kwargs"]
    architecture = {"model": record["name"], "input_size": kwargs.get("img_size"),
                    "patch_size": kwargs.get("patch_size"), "global_pool": kwargs.get("global_pool"),
                    "nb_classes": kwargs.get("num_classes") if args.dataset == "imagefolder" else None}
    ckpt.reconcile_resume_flags(args, parser, path, architecture, same={"model": _same_classifier},
                                flags={"global_pool": ("--global_pool", "--cls_token")})


def claim_output_folder(run: contextlib.ExitStack | None, args: argparse.Namespace, rt: Runtime) -> None:
    """Once the flags and the data are checked, before anything is written: the output folder
    becomes this run's alone, held by `run` to its end (`--eval` writes nothing and takes none)."""
    if run is not None and not args.eval:
        run.enter_context(run_folder.claim(args.output_dir, enabled=rt.is_main))


def finish(result: dict[str, Any]) -> dict[str, Any]:
    distributed.shutdown()
    return result


def classifier_args(name: str, args: argparse.Namespace, head: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The "model_args" record of the classifier `name` at the resolved input / patch size, with
    any encoder overrides and `kwargs`, resolved on the meta device (`registry.resolved_kwargs`);
    `head="batchnorm"`: the linear probe's. Sets `args.patch_size` to the one built."""
    for key in ("patch_size", *ENCODER_OVERRIDES):
        if getattr(args, key, None):
            kwargs[key] = getattr(args, key)
    kwargs.update(num_classes=args.nb_classes, global_pool=bool(args.global_pool), img_size=args.input_size)
    with torch.device("meta"):  # no memory, no weights: only what the factory resolves
        model = create_model(name, **kwargs)
    args.patch_size = model.patch_embed.patch_size[0]
    return ckpt.model_args(name, {**kwargs, **resolved_kwargs(model)}, head)


def create_classifier(name: str, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """The classifier `classifier_args` describes, freshly initialised."""
    return ckpt.build_model(classifier_args(name, args, **kwargs))


def evaluate_only(
    model: nn.Module, val_set: Dataset, args: argparse.Namespace, rt: Runtime, resume_state: Mapping | None
) -> dict[str, float]:
    """`--eval`: the `--resume` checkpoint's accuracy on val, nothing written."""
    record_args(args, rt.is_main)
    if resume_state is not None:
        load_resume_state(resume_state, model, seed=args.seed)
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
    model_args: Mapping[str, Any],
    mixup_fn: Callable | None = None,
    clip_grad: float | None = None,
) -> dict[str, Any]:
    """The reference epoch loop: train, evaluate, checkpoint, one log line; returns the last
    epoch's val accuracy (fractions), `max_acc1` and the training loss. `model_args`: the record
    `model` was built from, saved in every checkpoint."""
    device = rt.device
    pin = args.pin_mem and device.type == "cuda"
    scaler = rt.grad_scaler()
    start_epoch, max_acc1 = args.start_epoch, 0.0
    run_log = RunLog(args.output_dir or None, args.log_dir or None, enabled=rt.is_main)
    if resume_state is not None:
        start = load_resume_state(resume_state, model, optimizer, scaler, seed=args.seed)
        start_epoch = start if start is not None else start_epoch
        max_acc1 = float(resume_state.get("max_accuracy", 0.0))
        if rt.is_main and resume_state.get("log_stats"):
            run_log.write_epoch(resume_state["log_stats"])  # the line a kill after the checkpoint may have lost
    record_args(args, rt.is_main, args.output_dir)
    restore_missing_checkpoint(args, rt, resume_state)

    train_loader = data.build_loader(train_set, args.batch_size, train=True, num_workers=args.num_workers,
                                     pin_memory=pin, seed=args.seed)
    val_loader = _val_loader(val_set, args, pin)
    train_model = distributed.wrap_ddp(model, device)
    train_model = torch.compile(train_model) if args.compile else train_model
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
            state = ckpt.training_state(model, optimizer, epoch, args=args, model_args=model_args, scaler=scaler,
                                        device=device, log_stats=line, max_accuracy=max_acc1)
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
