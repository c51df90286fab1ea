"""Fine-tuning of a pre-trained MAE / U-MAE encoder, with the upstream command line.

    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --batch_size 32 --accum_iter 4 --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
        --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path /imagenet
    python main_finetune.py --dataset digits --model umae_vit_tiny_patch16 --finetune out/checkpoint-last.pth \
        --input_size 32 --epochs 10 --device cpu
    python main_finetune.py --eval --resume out_ft/checkpoint-last.pth --model vit_base_patch16 --data_path /imagenet

The patch size defaults to the --finetune (or --resume) checkpoint's.

This file only starts `umae_plugin.finetune` (the parser and the run live there); an installed
package gives the same command line as `umae-finetune`.
"""
from umae_plugin.finetune import check_args, entry, get_args_parser, main

__all__ = ["get_args_parser", "check_args", "main"]  # what users and launchers import from here

if __name__ == "__main__":
    entry()
