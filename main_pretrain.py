"""MAE / U-MAE pre-training, with the upstream command line.

    torchrun --nproc_per_node 8 main_pretrain.py --model umae_vit_base_patch16 --lambda_unif 0.01 \
        --batch_size 64 --accum_iter 8 --norm_pix_loss --epochs 400 --data_path /imagenet
    python main_pretrain.py --dataset digits --model umae_vit_tiny_patch16 --input_size 32 \
        --patch_size 4 --decoder_embed_dim 128 --decoder_depth 2 --epochs 5 --device cpu
"""
from __future__ import annotations

import argparse
import sys

from umae_plugin.data import DATASETS, DataError
from umae_plugin.models_mae import FEATURE_POOLS
from umae_plugin.pretrain import default_lambda, default_mask_ratio, run_pretrain
from umae_plugin.runtime import AMP_DTYPES, accept_local_rank_alias


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / U-MAE pre-training", add_help=False)
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per GPU (effective: batch_size * accum_iter * GPUs)")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    parser.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                        help="mae_vit_*, umae_vit_*, simmim_vit_*, usimmim_vit_* (tiny/small/base/large_patch16, huge_patch14)")
    parser.add_argument("--input_size", default=224, type=int, help="image size")
    parser.add_argument("--patch_size", default=None, type=int, help="patch size (default: the model's); 4 for 32-px images")
    parser.add_argument("--mask_ratio", default=None, type=float,
                        help="fraction of patches removed (default: 0.75; 0.6 for SimMIM models)")
    parser.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixels as targets")
    parser.set_defaults(norm_pix_loss=False)
    parser.add_argument("--embed_dim", default=None, type=int, help="encoder width override (small experiments)")
    parser.add_argument("--depth", default=None, type=int, help="encoder depth override")
    parser.add_argument("--num_heads", default=None, type=int, help="encoder heads override")
    parser.add_argument("--decoder_embed_dim", default=None, type=int)
    parser.add_argument("--decoder_depth", default=None, type=int)
    parser.add_argument("--decoder_num_heads", default=None, type=int)
    parser.add_argument("--grad_checkpointing", action="store_true", help="recompute blocks in backward (large models, small GPUs)")

    parser.add_argument("--lambda_unif", "--lamb", dest="lambda_unif", default=None, type=float,
                        help="weight of the uniformity term (default: 0.01 for umae_* models, 0 for mae_*)")
    parser.add_argument("--reg", default=None, choices=["none", "spectral", "entropy"],
                        help="U-MAE reference flag: 'none' turns the uniformity term off; the others keep it")
    parser.add_argument("--unif_pool", default="mean", choices=FEATURE_POOLS, help="features the uniformity term sees")

    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute lr (default: blr * effective batch / 256)")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR", help="base lr")
    parser.add_argument("--min_lr", type=float, default=0.0, metavar="LR")
    parser.add_argument("--warmup_epochs", type=int, default=40, metavar="N")

    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str)
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into --data_path if absent")
    parser.add_argument("--output_dir", default="./output_dir")
    parser.add_argument("--log_dir", default="./output_dir", help="TensorBoard folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint path, or 'auto' for the newest in --output_dir")
    parser.add_argument("--init_from", default="", help="start from the weights of any checkpoint the loader accepts")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-{epoch}.pth every N epochs")
    parser.add_argument("--print_freq", default=20, type=int, help="log (and sync with the device) every N steps")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    parser.add_argument("--amp", default=None, choices=list(AMP_DTYPES), help="autocast dtype (default: bf16 where supported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--online_probe", action="store_true", help="train a linear probe on detached features alongside")
    parser.add_argument("--val-interval", "--val_interval", dest="val_interval", default=1, type=int,
                        help="evaluate the online probe every N epochs")
    parser.add_argument("--erank_freq", default=1, type=int, help="effective rank of 100 fixed val images every N epochs (0: off)")
    parser.add_argument("--erank_samples", default=100, type=int)

    parser.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    parser.add_argument("--local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Resolve defaults that depend on other flags and refuse values that cannot work."""
    if args.lambda_unif is None:
        args.lambda_unif = default_lambda(args.model)
    if args.mask_ratio is None:
        args.mask_ratio = default_mask_ratio(args.model)
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
    if args.patch_size is not None and args.input_size % args.patch_size:
        parser.error(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    return args


def main(args: argparse.Namespace) -> dict:
    return run_pretrain(check_args(get_args_parser(), args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser("MAE / U-MAE pre-training", parents=[get_args_parser()])
    args = parser.parse_args(accept_local_rank_alias(sys.argv[1:]))
    try:
        main(args)
    except (DataError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
