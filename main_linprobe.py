"""Linear probing of a pre-trained MAE / U-MAE encoder, with the upstream command line.

    torchrun --nproc_per_node 8 main_linprobe.py --model vit_base_patch16 --cls_token \
        --finetune mae_pretrain_vit_base.pth --batch_size 2048 --epochs 90 --blr 0.1 \
        --weight_decay 0.0 --dist_eval --data_path /imagenet
    python main_linprobe.py --dataset digits --model umae_vit_tiny_patch16 --finetune out/checkpoint-last.pth \
        --cache_features --batch_size 256 --epochs 90 --device cpu

Input and patch size default to the --finetune checkpoint's. `--cache_features` trains the probe
on features of unaugmented images computed once (minutes on a CPU) and adds weighted k-NN accuracy;
one pass gives the class-token and the mean-pooled features and both are probed
(`test_acc1_cls`, `test_acc1_mean`, `knn_acc1_cls`, `knn_acc1_mean`; `test_acc1` stays the requested
pool's). With it, `--lr_search` picks the head's lr on a held-out 10% of the training set
(`probe_lr`), and `--baselines` adds raw-pixel and random-initialisation baselines.
"""
from __future__ import annotations

import argparse

from umae_plugin import classify, cli


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
                   help="extract frozen features of unaugmented images once (class token and mean pool in one "
                        "pass), train a probe on each pool, add k-NN accuracy")

    o = g[cli.OPTIM]
    cli.add_schedule_arguments(o, batch_size=512, epochs=90, weight_decay=0, blr=0.1, min_lr=0.0, warmup_epochs=10,
                               weight_decay_help="weight decay (0 for linear probe following MoCo v1)")
    o.add_argument("--lr_search", action="store_true",
                   help="with --cache_features: pick each head's lr from the lr (--lr, or --blr scaled) x "
                        "{0.1, 0.3, 1, 3, 10} on a stratified 10%% of the training set (seeded by --seed; "
                        "never the val set), then train on all of it; logged as probe_lr")

    r = g[cli.RUN]
    r.add_argument("--baselines", action="store_true",
                   help="with --cache_features: also log raw-pixel baselines (logistic regression, k-NN) and "
                        "the same model freshly initialised (seeded by --seed) probed the same way")

    cli.add_run_arguments(g, "dataset path (imagefolder: holds train/ and val/; cifar10: its root)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the flag (exit status 2, as argparse)."""
    try:
        classify.check_linprobe_flags(args)
        return classify.check_args(args, "linprobe")
    except classify.ConfigError as err:
        parser.error(str(err))


def main(args: argparse.Namespace) -> dict:
    return classify.run_linprobe(check_args(get_args_parser(), args))


if __name__ == "__main__":
    cli.run_main(get_args_parser, main)
