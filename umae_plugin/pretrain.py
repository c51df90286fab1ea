"""MAE / U-MAE pre-training: the command line of `main_pretrain.py` / `umae-pretrain`
(`get_args_parser`, `check_args`, `main`) and the run (`run_pretrain`).

Reads the argument namespace here, once, and hands explicit values to the data, model, optimiser,
engine and checkpoint modules. The run always resumes from its own output folder when asked
(`--resume auto`), which is what makes SLURM requeues safe.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

from . import checkpoint as ckpt
from . import cli, data, data_memory, distributed, run_folder
from .distributed import GATHER_MODES
from .engine_pretrain import (OnlineProbes, evaluate_knn, evaluate_probe, fixed_images, knn_bank_indices,
                              measure_collapse, train_one_epoch, unwrap)
from .features import FEATURES, TokenTap
from .errors import UsageError, UserError
from .logger import RunLog, peak_memory_mb
from .models_mae import FEATURE_POOLS
from .models_umae import REG_ALIASES, REGS
from .optim import param_groups_weight_decay, resolve_lr
from .registry import (create_model, default_lambda, default_mask_ratio, model_overrides, parse_model_name,
                       pretrain_factory, resolved_kwargs)
from .runtime import Runtime, adamw_options, record_args, setup_runtime

log = logging.getLogger("umae")

# Epoch-end measures also written as TensorBoard scalars (prefixes of their log keys).
EVAL_SCALARS = ("effective_rank_", "unif_", "online_probe_", "knn_")


# ---------------------------------------------------------------------------------------------
# command line


def boolean(text: str) -> bool:
    """An explicit boolean flag value: true/false, 1/0, yes/no, on/off (any case)."""
    value = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}.get(str(text).strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MAE / U-MAE pre-training")
    g = cli.groups(parser, cli.MODEL, cli.UNIFORMITY, cli.OPTIM, cli.DATA, cli.RUN, cli.LOGGING, cli.DIST)

    m = g[cli.MODEL]
    m.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                   help="Name of model to train: mae_vit_*, umae_vit_*, simmim_vit_*, usimmim_vit_* "
                        "(tiny/small/base/large_patch16, huge_patch14; _dec512d8b aliases)")
    m.add_argument("--input_size", default=224, type=int, help="images input size")
    m.add_argument("--patch_size", default=None, type=int, help="patch size (None: the model's); 4 suits 32-px images")
    m.add_argument("--mask_ratio", default=cli.DefaultMaskRatio(), type=float,
                   help="Masking ratio (percentage of removed patches); SimMIM models get 0.6 when the flag is not given")
    m.add_argument("--norm_pix_loss", action="store_true",
                   help="Use (per-patch) normalized pixels as targets for computing loss")
    parser.set_defaults(norm_pix_loss=False)
    m.add_argument("--embed_dim", default=None, type=int, help="encoder width (None: the model's)")
    m.add_argument("--depth", default=None, type=int, help="encoder blocks (None: the model's)")
    m.add_argument("--num_heads", default=None, type=int, help="encoder attention heads (None: the model's)")
    m.add_argument("--decoder_embed_dim", default=None, type=int, help="decoder width (None: the model's)")
    m.add_argument("--decoder_depth", default=None, type=int, help="decoder blocks (None: the model's)")
    m.add_argument("--decoder_num_heads", default=None, type=int, help="decoder attention heads (None: the model's)")
    m.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (large models, small GPUs)")
    m.add_argument("--init_from", default="", help="start from the weights of any checkpoint the loader accepts")

    u = g[cli.UNIFORMITY]
    u.add_argument("--lambda_unif", "--lamb", dest="lambda_unif", default=None, type=float,
                   help="weight of the uniformity term (None: 0.01 for umae_* / usimmim_* models, 0 for mae_* / simmim_*)")
    u.add_argument("--reg", default=None, choices=["none", *REGS, *REG_ALIASES],
                   help="the term (M-MAE's names): 'square' U-MAE's mean squared cosine, 'TCR' M-MAE's total coding "
                        "rate -logdet(I + mu/D Z^T Z); 'none' turns it off (lambda 0); the U-MAE reference's "
                        "'spectral' / 'entropy' mean 'square' (None: square)")
    u.add_argument("--uniformity_mu", "--uniformity_lamda", dest="uniformity_mu", default=1.0, type=float,
                   help="TCR: mu, the coding rate's scale (M-MAE's name; --uniformity_lamda: a spelling of its scripts)")
    u.add_argument("--centering", nargs="?", const=True, default=False, type=boolean, metavar="BOOL",
                   help="TCR: centre the batch's features first; a bare switch, or an explicit value as in M-MAE's "
                        "pretrain.sh (--centering False)")
    u.add_argument("--unif_gather", default="global", choices=GATHER_MODES,
                   help="the term's gradient across GPUs: 'global' the exact global-batch gradient (the same on any "
                        "number of GPUs); 'reference' the U-MAE / M-MAE code's, 1/world_size of it (reproduces a "
                        "reference run on W GPUs with its own lambda)")
    u.add_argument("--unif_pool", default="mean", choices=FEATURE_POOLS,
                   help="encoder features the uniformity term sees: mean of the patch tokens, or the class token")

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=64, epochs=400, weight_decay=0.05, blr=1e-3, min_lr=0.0, warmup_epochs=40)

    cli.add_run_arguments(g)
    g[cli.DATA].add_argument("--data_backend", default="pil", choices=data.DATA_BACKENDS,
                             help="training input pipeline (workers send uint8, the device normalises): pil = PIL "
                                  "decode and crop in the workers, the reference's values; tensor = torchvision's "
                                  "JPEG decoder and uint8 resize in the workers (faster, values close to PIL's); "
                                  "gpu = workers read file bytes, the device decodes (nvJPEG), crops and flips; "
                                  "memory = the set decoded once into a uint8 tensor on the device, each batch "
                                  "cropped, resized (torch's antialiased bicubic, PIL's kernel) and flipped there with "
                                  "the pil backend's draws (one image size; every DDP rank holds all of it). "
                                  "tensor / gpu: --dataset imagefolder")
    g[cli.DATA].add_argument("--memory_budget_mb", default=data_memory.DEFAULT_BUDGET_MB, type=float,
                             help="--data_backend memory: refuse a decoded set larger than this (MiB)")
    lg = g[cli.LOGGING]
    lg.add_argument("--online_probe", action="store_true",
                    help="train one linear probe per named feature (cls, mean, gpool) on detached features of the "
                         "masked pass alongside (paper appendix B.5); evaluated on masked (--mask_ratio, fixed "
                         "masks) and unmasked val views")
    lg.add_argument("--feature_pool", default=None, choices=FEATURE_POOLS,
                    help="the headline feature of the online probes and the k-NN monitor (unsuffixed keys; every "
                         "feature is logged with its name): mean of the final-normed patch tokens, or the class "
                         "token (None: --unif_pool)")
    lg.add_argument("--val-interval", "--val_interval", dest="val_interval", default=1, type=int,
                    help="evaluate the online probes after every N epochs of training (epochs N, 2N, ...) and "
                         "after the last")
    lg.add_argument("--erank_freq", default=1, type=int,
                    help="effective rank (uncentred and centred) and uniformity of every named feature (cls, mean, "
                         "gpool) of --erank_samples fixed val images after every N epochs of training and the last, "
                         "and before training (0: off)")
    lg.add_argument("--erank_samples", default=1024, type=int,
                    help="images the effective rank is measured on (at least the feature dimension)")
    lg.add_argument("--knn_freq", default=0, type=int,
                    help="k-NN monitor before training, after every N epochs of training and after the last (0: "
                         "off): weighted 20-NN top-1 (cosine, exp(s/0.07) votes, the cached probe's k-NN) of every "
                         "named feature of unmasked val images against --knn_bank unmasked training images, logged "
                         "as knn_acc1_<feature> (knn_acc1: --feature_pool's) and knn_time_s; cost: one "
                         "encoder pass over bank + val, about 2 minutes per evaluation on CIFAR-10 (ViT-Tiny, 32 px, "
                         "10,000 + 10,000 images) on 2 free CPU cores")
    lg.add_argument("--knn_bank", default=10000, type=int,
                    help="training images in the k-NN monitor's bank: the first N of a permutation seeded with 0 "
                         "(all if fewer)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Resolve defaults that depend on other flags and refuse values that cannot work. On
    `--resume`, the flags are first checked against the checkpoint's model (`adopt_resume_model`)."""
    args.reg = REG_ALIASES.get(args.reg, args.reg)
    adopt_resume_model(args)
    if args.lambda_unif is None:
        args.lambda_unif = default_lambda(args.model)
    if isinstance(args.mask_ratio, cli.DefaultMaskRatio):  # not on the command line
        args.mask_ratio = default_mask_ratio(args.model)
    args.mask_ratio = float(args.mask_ratio)
    if args.reg == "none":
        args.lambda_unif = 0.0
    elif args.reg is not None and args.lambda_unif == 0:
        log.warning("--reg %s with lambda_unif 0: the term is off (plain MAE / SimMIM); pass --lambda_unif (--lamb) "
                    "to use it", args.reg)
    if not (math.isfinite(args.uniformity_mu) and args.uniformity_mu > 0):
        parser.error(f"--uniformity_mu must be a finite number > 0, got {args.uniformity_mu}")
    if args.lambda_unif > 0 and args.reg in (None, "square") and (args.uniformity_mu != 1.0 or args.centering):
        log.warning("--uniformity_mu and --centering set M-MAE's TCR term; the square term (--reg %s) ignores them",
                    args.reg or "square (default)")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.lambda_unif < 0:
        parser.error(f"--lambda_unif must be >= 0, got {args.lambda_unif}")
    for name in ("batch_size", "epochs", "accum_iter", "print_freq", "save_freq", "val_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.erank_freq < 0:
        parser.error(f"--erank_freq must be >= 0, got {args.erank_freq}")
    if args.knn_freq < 0:
        parser.error(f"--knn_freq must be >= 0, got {args.knn_freq}")
    if args.knn_bank < 1:
        parser.error(f"--knn_bank must be >= 1, got {args.knn_bank}")
    if args.feature_pool is None:
        args.feature_pool = args.unif_pool
    if args.patch_size is not None and args.input_size % args.patch_size:
        parser.error(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    try:
        check_model_args(args)
    except UsageError as err:
        parser.error(str(err))
    return args


ARCH_FLAGS = {"input_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
              "num_heads": "num_heads", "decoder_embed_dim": "decoder_embed_dim", "decoder_depth": "decoder_depth",
              "decoder_num_heads": "decoder_num_heads"}  # flag -> the model_args keyword it sets


def _same_model(a: str, b: str) -> bool:
    """Same family and encoder (`umae_*` / `mae_*` differ only in the loss: `lambda_unif`)."""
    try:
        pa, pb = parse_model_name(a), parse_model_name(b)
    except ValueError:
        return a == b
    return (pa.family, pa.arch) == (pb.family, pb.arch)


def adopt_resume_model(args: argparse.Namespace) -> None:
    """On `--resume` (a file, or `auto` with a checkpoint in the output folder): the flags against
    the checkpoint's "model_args" (`checkpoint.reconcile_resume_flags`). `--model` (family and
    encoder), `--input_size`, `--patch_size` and the encoder / decoder sizes that contradict it are
    refused (exit 2), those left at their defaults take the checkpoint's values; `--lambda_unif`,
    `--unif_pool`, the term (`--reg`, `--uniformity_mu`, `--centering`; a record without them
    means `square`), `--norm_pix_loss` and `--mask_ratio` given with other values are used, with a
    warning. A file whose model cannot be read is left to the load, which names what is wrong."""
    path = ckpt.resolve_resume(args.resume, args.output_dir) if args.resume else None
    if path is None:
        return
    state = ckpt.read_checkpoint(path, "--resume", mmap=True)
    try:
        record = ckpt.checkpoint_model_args(state)
    except (ValueError, TypeError) as err:
        log.debug("--resume %s: no model to compare the flags with (%s)", path, err)
        return
    parser, kwargs = get_args_parser(), record["kwargs"]
    if args.lambda_unif is None and not ckpt.at_parser_default(parser, args, "model"):
        args.lambda_unif = default_lambda(args.model)  # the given name's, compared below
    lambda_unif = float(kwargs.get("lambda_unif", 0.0))
    architecture = {"model": record["name"], **{flag: kwargs.get(key) for flag, key in ARCH_FLAGS.items()}}
    term = lambda_unif > 0
    losses = {"lambda_unif": lambda_unif, "unif_pool": kwargs.get("unif_pool") if term else None,
              "reg": kwargs.get("reg", "square") if term else None,
              "uniformity_mu": kwargs.get("uniformity_mu", 1.0) if term else None,
              "centering": kwargs.get("centering", False) if term else None,
              "norm_pix_loss": kwargs.get("norm_pix_loss"),
              "mask_ratio": (ckpt.stored_args(state) or {}).get("mask_ratio")}
    ckpt.reconcile_resume_flags(args, parser, path, architecture, losses, same={"model": _same_model})


def main(args: argparse.Namespace) -> dict:
    return run_pretrain(check_args(get_args_parser(), args))


def entry() -> None:
    """`umae-pretrain` (and `python main_pretrain.py`)."""
    cli.run_main(get_args_parser, main)


# ---------------------------------------------------------------------------------------------
# the run


def pretrain_model_args(args: argparse.Namespace) -> dict[str, Any]:
    """The "model_args" record of the model the flags describe (`checkpoint.model_args`): the
    factory `registry.pretrain_factory` picks and its keywords, resolved on the meta device (the
    factory's defaults filled in: geometry, encoder, decoder, loss settings). The run builds its
    model from this record (`checkpoint.build_model`) and saves it in every checkpoint."""
    name, kwargs = pretrain_factory(args.model, lambda_unif=args.lambda_unif, unif_pool=args.unif_pool,
                                    **model_overrides(args))
    with torch.device("meta"):  # no memory, no weights: only what the factory resolves
        model = create_model(name, **kwargs)
    return ckpt.model_args(name, {**kwargs, **resolved_kwargs(model)})


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse, before any data is read or file written, a `--model` that names no model, an
    `--input_size` the (resolved) patch size does not divide, and a `--mask_ratio` that leaves
    nothing to learn: MAE needs at least one visible and one masked patch, SimMIM at least one
    masked block. The model is built on the meta device (no memory, no weights); raises
    `UsageError` naming the flag and the patch counts."""
    try:
        with torch.device("meta"):
            model = ckpt.build_model(pretrain_model_args(args))
    except (ValueError, TypeError, KeyError, AssertionError, AttributeError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    patch = model.patch_embed.patch_size[0]
    if args.input_size % patch:
        raise UsageError(f"--input_size {args.input_size} is not a multiple of the patch size {patch} of "
                         f"{args.model}; pass --patch_size or another --input_size")
    grid_h, grid_w = model.grid_size
    patches = grid_h * grid_w
    where = f"{patches} patches ({args.input_size} px, patch {patch})"
    block = getattr(model, "mask_block", None)
    if block is not None:  # SimMIM: square blocks of block x block patches
        if grid_h % block or grid_w % block:
            raise UsageError(f"--input_size {args.input_size}: the {grid_h}x{grid_w} patch grid is not a multiple "
                             f"of SimMIM's {block}x{block} mask blocks")
        blocks = (grid_h // block) * (grid_w // block)
        if math.ceil(blocks * args.mask_ratio) < 1:
            raise UsageError(f"--mask_ratio {args.mask_ratio} masks none of the {blocks} mask blocks of {where}: "
                             "SimMIM needs at least one masked block")
        return
    keep = int(patches * (1 - args.mask_ratio))  # the reference's count of visible patches
    if keep < 1 or keep > patches - 1:
        raise UsageError(f"--mask_ratio {args.mask_ratio} keeps {keep} of {where} visible: MAE needs at least "
                         "one visible and one masked patch")


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train, checkpoint and log as the upstream script does; returns the last epoch's stats."""
    rt: Runtime = setup_runtime(args.device, args.seed, args.amp, dist_url=args.dist_url,
                                world_size=args.world_size, dist_on_itp=args.dist_on_itp)
    # Data first: a wrong path, or a batch larger than the data, fails before anything is built or
    # written. Then the output folder is this run's alone, until the end.
    train_set, val_set = _datasets(args, rt)
    knn_sets = _knn_datasets(args) if args.knn_freq > 0 else None
    with run_folder.claim(args.output_dir, enabled=rt.is_main):
        return _pretrain(args, rt, train_set, val_set, knn_sets=knn_sets)


def _datasets(args: argparse.Namespace, rt: Runtime) -> tuple[Any, Any]:
    """The training set and, when the effective rank or the online probe needs one, the val set
    (the training images, unaugmented, when there is no val split and only the rank needs it)."""
    backend = getattr(args, "data_backend", "pil")
    if backend == "memory":  # decoded once into a tensor when the loader is built (`data_memory`)
        train_set = data_memory.source_dataset(args.dataset, args.data_path, args.download)
    else:
        train_set = data.build_pretrain_dataset(args.dataset, args.data_path, args.input_size, backend, args.download)
    data.require_full_batch(train_set, args.batch_size, rt.world_size)
    val_set = None
    if args.online_probe or args.erank_freq > 0:
        try:
            val_set = data.build_dataset(args.dataset, args.data_path, "val", data.eval_transform(args.input_size), args.download)
        except data.DataError as err:
            if args.online_probe:
                raise
            log.warning("no val split (%s): effective rank is measured on training images", err)
            val_set = data.build_dataset(args.dataset, args.data_path, "train", data.eval_transform(args.input_size))
    return train_set, val_set


def _knn_datasets(args: argparse.Namespace) -> tuple[Any, Any]:
    """The k-NN monitor's (bank, val) sets, both unaugmented: `--knn_bank` training images
    (`knn_bank_indices`, seed 0) and the whole val split, which it needs (a `DataError` otherwise)."""
    transform = data.eval_transform(args.input_size)
    train = data.build_dataset(args.dataset, args.data_path, "train", transform, args.download)
    val = data.build_dataset(args.dataset, args.data_path, "val", transform, args.download)
    return torch.utils.data.Subset(train, knn_bank_indices(len(train), args.knn_bank)), val


def _knn_monitor(model: torch.nn.Module, sets: tuple[Any, Any], args: argparse.Namespace, rt: Runtime,
                 pool: str) -> dict[str, float]:
    """`evaluate_knn` on fresh evaluation loaders of the (bank, val) sets (their workers end with it)."""
    bank_loader, val_loader = (data.build_loader(s, args.batch_size, train=False, num_workers=args.num_workers,
                                                 pin_memory=args.pin_mem and rt.device.type == "cuda") for s in sets)
    return evaluate_knn(model, bank_loader, val_loader, rt.device, rt.autocast, pool=pool,
                        num_classes=data.num_classes(sets[1]))


def _pretrain(args: argparse.Namespace, rt: Runtime, train_set: Any, val_set: Any,
              knn_sets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    device = rt.device
    pin_memory = args.pin_mem and device.type == "cuda"
    if getattr(args, "data_backend", "pil") == "memory":
        loader = data_memory.build_memory_loader(train_set, args.batch_size, input_size=args.input_size, device=device,
                                                 seed=args.seed, budget_mb=args.memory_budget_mb,
                                                 num_workers=args.num_workers)
    else:
        loader = data.build_pretrain_loader(train_set, args.batch_size, backend=getattr(args, "data_backend", "pil"),
                                            device=device, input_size=args.input_size, num_workers=args.num_workers,
                                            pin_memory=pin_memory, seed=args.seed)

    record = pretrain_model_args(args)
    model = ckpt.build_model(record)  # from the record the checkpoints carry: they rebuild exactly this model
    if args.init_from:
        report = ckpt.load_pretrained(model, ckpt.read_checkpoint(args.init_from, "--init_from"),
                                      f"--init_from {args.init_from}")
        log.info("initialised from %s: %s", args.init_from, report)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if hasattr(model, "set_unif_gather"):  # the uniformity family's models
        model.set_unif_gather(args.unif_gather)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s (%s, lambda_unif %g%s): %.2fM trainable parameters", args.model, type(model).__name__,
             args.lambda_unif, f", {model.reg}, {args.unif_gather} gradient" if hasattr(model, "reg") else "",
             n_params / 1e6)

    eff_batch = args.batch_size * args.accum_iter * rt.world_size
    args.lr = resolve_lr(args.lr, args.blr, args.batch_size, args.accum_iter, rt.world_size)
    log.info("effective batch %d, lr %.3e (blr %.3e)", eff_batch, args.lr, args.blr)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                  **adamw_options(device))
    scaler = rt.grad_scaler()

    probe = probe_optimizer = tap = None
    feature_pool = getattr(args, "feature_pool", None) or args.unif_pool
    if args.online_probe:
        probe = OnlineProbes(model.embed_dim, data.num_classes(train_set)).to(device)
        probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.0, **adamw_options(device))
        tap = TokenTap(model.norm)  # before any wrapper or compile: registered once
        log.info("online probes, one per feature (%s; headline %s): trained on %g-masked views, evaluated on "
                 "masked and unmasked val views", ", ".join(FEATURES), feature_pool, args.mask_ratio)

    start_epoch = args.start_epoch
    resume = ckpt.resolve_resume(args.resume, args.output_dir)
    if resume is not None:
        state = ckpt.read_checkpoint(resume, "--resume")
        origin = f"--resume {resume}"
        start = ckpt.restore_training_state(state, model, optimizer, scaler, seed=args.seed, origin=origin)
        if start is None:
            raise UserError(f"{origin}: not a checkpoint of this run's model and optimizer (it holds no optimizer "
                            "state and epoch)")
        if probe is not None and state.get("online_probe"):
            try:
                probe.load_state_dict(state["online_probe"]["model"])
                probe_optimizer.load_state_dict(state["online_probe"]["optimizer"])
            except (KeyError, RuntimeError, ValueError, TypeError) as err:
                raise UserError(f"{origin}: its online probe does not fit this run's "
                                f"({type(err).__name__}: {ckpt.first_line(err)})") from err
        start_epoch = start
        log.info("resumed from %s (epoch %d)", resume, start - 1)

    run_log = RunLog(args.output_dir, args.log_dir, enabled=rt.is_main)
    record_args(args, rt.is_main, args.output_dir)
    if rt.is_main and args.output_dir:
        if resume is not None and state.get("log_stats"):
            run_log.write_epoch(state["log_stats"])  # the line a kill after the checkpoint may have lost
        if resume is not None:  # the numbered checkpoint a kill during its write lost
            ckpt.restore_missing_checkpoint(args.output_dir, state, args.save_freq, args.epochs, args.resume)

    train_model = distributed.wrap_ddp(model, device)
    if probe is not None:
        probe = distributed.wrap_ddp(probe, device)
    if args.compile:
        train_model = torch.compile(train_model)

    erank_images = fixed_images(val_set, args.erank_samples).to(device) if args.erank_freq > 0 and rt.is_main else None
    if erank_images is not None and len(erank_images) < model.embed_dim:
        log.warning("effective rank on %d images, fewer than the %d feature dimensions: it cannot exceed %d "
                    "(--erank_samples)", len(erank_images), model.embed_dim, len(erank_images))
    measure = dict(batch_size=args.batch_size, autocast=rt.autocast)
    # Before any training step, only for a fresh run: on the first epoch line, `*_init_*` keys.
    init_stats = (measure_collapse(model, erank_images, init=True, **measure)
                  if erank_images is not None and resume is None else {})
    if knn_sets is not None and resume is None:  # the k-NN monitor of the initial weights (curves start at 0)
        init_stats.update({k.replace("knn_acc1", "knn_acc1_init"): v
                           for k, v in _knn_monitor(model, knn_sets, args, rt, feature_pool).items()
                           if k.startswith("knn_acc1")})
    if init_stats:
        run_log.scalars(init_stats, start_epoch * 1000)
    probe_loader = (data.build_loader(val_set, args.batch_size, train=False, num_workers=args.num_workers,
                                      pin_memory=pin_memory) if probe is not None else None)
    schedule = dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)

    # A finished run asked to resume trains nothing and reports its final epoch's stats.
    stats: dict[str, Any] = dict(state.get("log_stats") or {}) if resume is not None else {}
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(loader, epoch)
        train_stats = train_one_epoch(
            train_model, loader, optimizer, device=device, epoch=epoch, mask_ratio=args.mask_ratio,
            schedule=schedule, accum_iter=args.accum_iter, autocast=rt.autocast, scaler=scaler,
            probe=probe, probe_optimizer=probe_optimizer, probe_tap=tap, print_freq=args.print_freq, run_log=run_log,
        )
        stats = {f"train_{k}": v for k, v in train_stats.items()}
        if epoch == start_epoch:
            stats.update(init_stats)
        last = epoch + 1 == args.epochs
        done = epoch + 1  # monitors after every N epochs of training: epochs N, 2N, ... and the last
        if erank_images is not None and (done % args.erank_freq == 0 or last):
            stats.update(measure_collapse(model, erank_images, **measure))
        if probe is not None and (done % args.val_interval == 0 or last):
            stats.update(evaluate_probe(model, probe, probe_loader, device, rt.autocast,
                                        mask_ratio=args.mask_ratio, pool=feature_pool))
        if knn_sets is not None and (done % args.knn_freq == 0 or last):  # every rank: extraction is shared
            stats.update(_knn_monitor(model, knn_sets, args, rt, feature_pool))
        stats.update(epoch=epoch, n_parameters=n_params, max_mem_mb=peak_memory_mb(device))

        if args.output_dir and rt.is_main:
            state = ckpt.training_state(model, optimizer, epoch, args=args, model_args=record, scaler=scaler,
                                        device=device, log_stats=stats)
            if probe is not None:
                state["online_probe"] = {"model": unwrap(probe).state_dict(), "optimizer": probe_optimizer.state_dict()}
            ckpt.save_checkpoint(args.output_dir, state, epoch, args.save_freq, last)
        run_log.write_epoch(stats)
        run_log.scalars({k: v for k, v in stats.items() if k.startswith(EVAL_SCALARS) and "_init_" not in k},
                        (epoch + 1) * 1000)
        log.info("epoch %d done: %s", epoch, {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()})

    stats["wall_time_s"] = time.time() - start
    log.info("training time %.1f s", stats["wall_time_s"])
    if tap is not None:
        tap.remove()
    run_log.close()
    distributed.shutdown()
    return stats
