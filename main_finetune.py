"""Fine-tuning of a pre-trained MAE / U-MAE encoder, with the upstream command line.

    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --batch_size 32 --accum_iter 4 --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
        --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path /imagenet
    python main_finetune.py --dataset digits --model umae_vit_tiny_patch16 --finetune out/checkpoint-last.pth \
        --input_size 32 --epochs 10 --device cpu
    python main_finetune.py --eval --resume out_ft/checkpoint-last.pth --model vit_base_patch16 --data_path /imagenet

The patch size defaults to the --finetune (or --resume) checkpoint's.
"""
from __future__ import annotations

import argparse
import sys

from umae_plugin import classify
from umae_plugin.runtime import accept_local_rank_alias


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE fine-tuning for image classification", add_help=False)
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU (effective batch size is batch_size * accum_iter * # gpus")
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="accumulate gradient iterations (for increasing the effective batch size under memory constraints)")

    # model
    parser.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                        help="name of model to train (vit_*, or the mae_vit_* / umae_vit_* it was pre-trained as)")
    parser.add_argument("--input_size", default=224, type=int, help="images input size")
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate (default: 0.1)")

    # optimizer
    parser.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: None, no clipping)")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    parser.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")
    parser.add_argument("--min_lr", type=float, default=1e-6, metavar="LR", help="lower lr bound for cyclic schedulers that hit 0")
    parser.add_argument("--warmup_epochs", type=int, default=5, metavar="N", help="epochs to warmup LR")

    # augmentation
    parser.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                        help="color jitter factor (enabled only when not using Auto/RandAug)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='use AutoAugment policy. "v0" or "original". " + "(default: rand-m9-mstd0.5-inc1)')
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")

    # random erase
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase prob (default: 0.25)")
    parser.add_argument("--remode", type=str, default="pixel", help='random erase mode (default: "pixel")')
    parser.add_argument("--recount", type=int, default=1, help="random erase count (default: 1)")
    parser.add_argument("--resplit", action="store_true", default=False,
                        help="do not random erase first (clean) augmentation split (accepted; no effect, as upstream)")

    # mixup
    parser.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0.")
    parser.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0.")
    parser.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                        help="cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)")
    parser.add_argument("--mixup_prob", type=float, default=1.0,
                        help="probability of performing mixup or cutmix when either/both is enabled")
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5,
                        help="probability of switching to cutmix when both mixup and cutmix enabled")
    parser.add_argument("--mixup_mode", type=str, default="batch",
                        help='how to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    # finetuning
    parser.add_argument("--finetune", default="", help="finetune from checkpoint (any MAE / U-MAE / timm format)")
    parser.add_argument("--global_pool", action="store_true")
    parser.set_defaults(global_pool=True)
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="use class token instead of global pool for classification")
    return classify.add_common_arguments(parser)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the flag (exit status 2, as argparse)."""
    try:
        return classify.check_args(args, "finetune")
    except classify.ConfigError as err:
        parser.error(str(err))


def main(args: argparse.Namespace) -> dict:
    return classify.run_finetune(check_args(get_args_parser(), args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser("MAE fine-tuning for image classification", parents=[get_args_parser()])
    args = parser.parse_args(accept_local_rank_alias(sys.argv[1:]))
    try:
        main(args)
    except classify.USER_ERRORS as err:
        sys.exit(f"error: {err}")
