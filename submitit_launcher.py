"""Submit pre-training, linear probing or fine-tuning to SLURM through submitit (or run it locally).

    python submitit_launcher.py {pretrain,linprobe,finetune} [launcher flags] [the script's flags]

The script's flags are exactly those of main_pretrain.py / main_linprobe.py / main_finetune.py.
The upstream MAE command lines work after the subcommand, e.g. on 8 nodes of 8 V100s:

    python submitit_launcher.py pretrain --job_dir /checkpoint/$USER/mae_large --nodes 8 --use_volta32 \
        --batch_size 64 --model mae_vit_large_patch16 --norm_pix_loss --mask_ratio 0.75 --epochs 800 \
        --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path $IMAGENET_DIR

A U-MAE sweep over the uniformity weight (one job array, one output folder per value):

    python submitit_launcher.py pretrain --job_dir /checkpoint/$USER/umae_%j --nodes 1 --ngpus 8 \
        --model umae_vit_base_patch16 --sweep lambda_unif=0,0.001,0.01 --data_path $IMAGENET_DIR

The same on a machine without SLURM (CPU processes, gloo): add `--cluster local --nodes 1 --ngpus 0
--tasks_per_node 2`. Without --job_dir the job folder is $UMAE_JOB_DIR/%j. `--dry_run` prints the
sbatch script instead of submitting. Jobs resume from their output folder (`--resume auto`) unless
--resume is given, so a requeued or resubmitted job continues where it stopped; see
umae_plugin/slurm.py for the details. Installed, the same command is `umae-submit`.
"""
import sys

from umae_plugin.slurm import main, parse_args

__all__ = ["main", "parse_args"]  # parse_args: for tests and notebooks

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
