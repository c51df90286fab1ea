#!/usr/bin/env bash
# Lambda sweep on the embedded digits data (paper Table 3 layout), CPU, ~10 minutes on 2 cores.
#
#   bash recipes/digits_lambda_sweep.sh [OUT]
#
# Same small ViT, seed and budget as the quick start; only lambda_unif changes. Each run is then
# probed on cached features, and the sweep tool gathers everything into one table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/digits-sweep}
EPOCHS=${EPOCHS:-20}

for lambda in 0 0.001 0.01 0.1 1; do
    dir="$OUT/lambda_unif=$lambda"
    python main_pretrain.py --model mae_vit_tiny_patch16 --embed_dim 128 --depth 4 --num_heads 4 \
        --decoder_embed_dim 64 --decoder_depth 1 --decoder_num_heads 4 --input_size 32 --patch_size 4 \
        --dataset digits --lambda_unif "$lambda" --epochs "$EPOCHS" --warmup_epochs 3 --batch_size 64 \
        --blr 1e-3 --seed 0 --device cpu --num_workers 0 --print_freq 1000 --online_probe \
        --output_dir "$dir" --log_dir "$dir" --resume auto
    python main_linprobe.py --model vit_tiny_patch16 --finetune "$dir/checkpoint-last.pth" --global_pool \
        --cache_features --dataset digits --epochs 100 --warmup_epochs 10 --batch_size 256 --lr 4.0 \
        --device cpu --num_workers 0 --output_dir "$dir/linprobe" --log_dir "$dir/linprobe"
done
python -m umae_plugin.analysis sweep --sweep_dir "$OUT" --output_dir "$OUT/summary"
