"""Linear probing of a pre-trained MAE / U-MAE encoder, with the upstream command line.

    torchrun --nproc_per_node 8 main_linprobe.py --model vit_base_patch16 --cls_token \
        --finetune mae_pretrain_vit_base.pth --batch_size 2048 --epochs 90 --blr 0.1 \
        --weight_decay 0.0 --dist_eval --data_path /imagenet
    python main_linprobe.py --dataset digits --model umae_vit_tiny_patch16 --finetune out/checkpoint-last.pth \
        --cache_features --batch_size 256 --epochs 90 --device cpu

Input and patch size default to the --finetune checkpoint's. `--cache_features` trains the probe
on features of unaugmented images computed once (minutes on a CPU) and adds weighted k-NN accuracy.
"""
from __future__ import annotations

import argparse
import sys

from umae_plugin import classify
from umae_plugin.runtime import accept_local_rank_alias


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE linear probing for image classification", add_help=False)
    parser.add_argument("--batch_size", default=512, type=int,
                        help="batch size per GPU (effective batch size is batch_size * accum_iter * # gpus")
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="accumulate gradient iterations (for increasing the effective batch size under memory constraints)")

    parser.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                        help="name of model to train (vit_*, or the mae_vit_* / umae_vit_* it was pre-trained as)")
    parser.add_argument("--input_size", default=None, type=int,
                        help="images input size (default: the --finetune checkpoint's, else 224)")

    parser.add_argument("--weight_decay", type=float, default=0, help="weight decay (default: 0 for linear probe following MoCo v1)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    parser.add_argument("--blr", type=float, default=0.1, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="lower lr bound for cyclic schedulers that hit 0")
    parser.add_argument("--warmup_epochs", type=int, default=10, metavar="N", help="epochs to warmup LR")

    parser.add_argument("--finetune", default="", help="probe the encoder of this checkpoint (any MAE / U-MAE / timm format)")
    parser.add_argument("--global_pool", action="store_true", help="average the patch tokens (then fc_norm)")
    parser.set_defaults(global_pool=False)
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="use class token instead of global pool for classification")
    parser.add_argument("--cache_features", action="store_true",
                        help="extract frozen features of unaugmented images once, train the probe on them, add k-NN accuracy")
    return classify.add_common_arguments(parser)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the flag (exit status 2, as argparse)."""
    try:
        return classify.check_args(args, "linprobe")
    except classify.ConfigError as err:
        parser.error(str(err))


def main(args: argparse.Namespace) -> dict:
    return classify.run_linprobe(check_args(get_args_parser(), args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser("MAE linear probing for image classification", parents=[get_args_parser()])
    args = parser.parse_args(accept_local_rank_alias(sys.argv[1:]))
    try:
        main(args)
    except classify.USER_ERRORS as err:
        sys.exit(f"error: {err}")
