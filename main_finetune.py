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

from umae_plugin import classify, cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MAE fine-tuning for image classification")
    g = cli.groups(parser, cli.MODEL, cli.OPTIM, cli.AUGMENT, cli.DATA, cli.RUN, cli.LOGGING, cli.DIST)

    m = g[cli.MODEL]
    m.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                   help="Name of model to train: vit_*, or the mae_vit_* / umae_vit_* / simmim_vit_* name it "
                        "was pre-trained as")
    m.add_argument("--input_size", default=224, type=int, help="images input size")
    m.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="Drop path rate")
    cli.add_classification_arguments(g, global_pool=True)

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=64, epochs=50, weight_decay=0.05, blr=1e-3, min_lr=1e-6, warmup_epochs=5)
    o.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="Clip gradient norm (None: no clipping)")
    o.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")
    o.add_argument("--smoothing", type=float, default=0.1, help="Label smoothing")

    a = g[cli.AUGMENT]
    a.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                   help="Color jitter factor (enabled only when not using Auto/RandAug)")
    a.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help='Use AutoAugment policy. "v0" or "original", or a RandAugment string')
    a.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="Random erase prob")
    a.add_argument("--remode", type=str, default="pixel", help="Random erase mode")
    a.add_argument("--recount", type=int, default=1, help="Random erase count")
    a.add_argument("--resplit", action="store_true", default=False,
                   help="Do not random erase first (clean) augmentation split (accepted; no effect, as upstream)")
    a.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0.")
    a.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0.")
    a.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    a.add_argument("--mixup_prob", type=float, default=1.0,
                   help="Probability of performing mixup or cutmix when either/both is enabled")
    a.add_argument("--mixup_switch_prob", type=float, default=0.5,
                   help="Probability of switching to cutmix when both mixup and cutmix enabled")
    a.add_argument("--mixup_mode", type=str, default="batch",
                   help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    cli.add_run_arguments(g, "dataset path (imagefolder: holds train/ and val/; cifar10: its root)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the flag (exit status 2, as argparse)."""
    try:
        return classify.check_args(args, "finetune")
    except classify.ConfigError as err:
        parser.error(str(err))


def main(args: argparse.Namespace) -> dict:
    return classify.run_finetune(check_args(get_args_parser(), args))


if __name__ == "__main__":
    cli.run_main(get_args_parser, main)
