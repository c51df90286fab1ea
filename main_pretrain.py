"""MAE / U-MAE pre-training, with the upstream command line.

    torchrun --nproc_per_node 8 main_pretrain.py --model umae_vit_base_patch16 --lambda_unif 0.01 \
        --batch_size 64 --accum_iter 8 --norm_pix_loss --epochs 400 --data_path /imagenet
    python main_pretrain.py --dataset digits --model umae_vit_tiny_patch16 --input_size 32 \
        --patch_size 4 --decoder_embed_dim 128 --decoder_depth 2 --epochs 5 --device cpu

This file only starts `umae_plugin.pretrain` (the parser and the run live there); an installed
package gives the same command line as `umae-pretrain`.
"""
from umae_plugin.pretrain import check_args, entry, get_args_parser, main

__all__ = ["get_args_parser", "check_args", "main"]  # what users and launchers import from here

if __name__ == "__main__":
    entry()
