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

This file only starts `umae_plugin.linprobe` (the parser and the run live there); an installed
package gives the same command line as `umae-linprobe`.
"""
from umae_plugin.linprobe import check_args, entry, get_args_parser, main

__all__ = ["get_args_parser", "check_args", "main"]  # what users and launchers import from here

if __name__ == "__main__":
    entry()
