"""MAE / U-MAE pre-training, with the upstream command line.

    torchrun --nproc_per_node 8 main_pretrain.py --model umae_vit_base_patch16 --lambda_unif 0.01 \
        --batch_size 64 --accum_iter 8 --norm_pix_loss --epochs 400 --data_path /imagenet
    python main_pretrain.py --dataset digits --model umae_vit_tiny_patch16 --input_size 32 \
        --patch_size 4 --decoder_embed_dim 128 --decoder_depth 2 --epochs 5 --device cpu
"""
from __future__ import annotations

import argparse

from umae_plugin import cli
from umae_plugin.models_mae import FEATURE_POOLS
from umae_plugin.errors import UsageError
from umae_plugin.pretrain import check_model_args, default_lambda, default_mask_ratio, run_pretrain


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
    u.add_argument("--reg", default=None, choices=["none", "spectral", "entropy"],
                   help="U-MAE reference flag: 'none' turns the uniformity term off; the others keep it")
    u.add_argument("--unif_pool", default="mean", choices=FEATURE_POOLS,
                   help="encoder features the uniformity term sees: mean of the patch tokens, or the class token")

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=64, epochs=400, weight_decay=0.05, blr=1e-3, min_lr=0.0, warmup_epochs=40)

    cli.add_run_arguments(g)
    lg = g[cli.LOGGING]
    lg.add_argument("--online_probe", action="store_true",
                    help="train a linear probe on detached features of the masked pass alongside (paper appendix "
                         "B.5); evaluated on masked (--mask_ratio, fixed masks) and unmasked val views")
    lg.add_argument("--feature_pool", default=None, choices=FEATURE_POOLS,
                    help="the online probe's features: mean of the final-normed patch tokens, or the class token "
                         "(None: --unif_pool)")
    lg.add_argument("--val-interval", "--val_interval", dest="val_interval", default=1, type=int,
                    help="evaluate the online probe every N epochs")
    lg.add_argument("--erank_freq", default=1, type=int,
                    help="effective rank (uncentred and centred) and uniformity of both pools of --erank_samples "
                         "fixed val images every N epochs, and before training (0: off)")
    lg.add_argument("--erank_samples", default=1024, type=int,
                    help="images the effective rank is measured on (at least the feature dimension)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Resolve defaults that depend on other flags and refuse values that cannot work."""
    if args.lambda_unif is None:
        args.lambda_unif = default_lambda(args.model)
    if isinstance(args.mask_ratio, cli.DefaultMaskRatio):  # not on the command line
        args.mask_ratio = default_mask_ratio(args.model)
    args.mask_ratio = float(args.mask_ratio)
    if args.reg == "none":
        args.lambda_unif = 0.0
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.lambda_unif < 0:
        parser.error(f"--lambda_unif must be >= 0, got {args.lambda_unif}")
    for name in ("batch_size", "epochs", "accum_iter", "print_freq", "save_freq", "val_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.erank_freq < 0:
        parser.error(f"--erank_freq must be >= 0, got {args.erank_freq}")
    if args.feature_pool is None:
        args.feature_pool = args.unif_pool
    if args.patch_size is not None and args.input_size % args.patch_size:
        parser.error(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    try:
        check_model_args(args)
    except UsageError as err:
        parser.error(str(err))
    return args


def main(args: argparse.Namespace) -> dict:
    return run_pretrain(check_args(get_args_parser(), args))


if __name__ == "__main__":
    cli.run_main(get_args_parser, main)
