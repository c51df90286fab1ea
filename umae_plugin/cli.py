"""Command-line pieces the three scripts share: the parser shape (groups, defaults shown in
`--help`), the flags they declare alike (data, runtime, checkpoints and logging, distributed),
and the `__main__` wrapper that turns a user error into one line and a non-zero exit.

The flags keep the MAE reference's names, defaults and, where it had one, its help wording, so
the reference's command lines and launch scripts work unchanged.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .data import DATASETS
from .errors import one_line_errors
from .runtime import AMP_DTYPES

# Group titles, in the order `--help` lists them.
MODEL, UNIFORMITY, OPTIM, AUGMENT, DATA, RUN, LOGGING, DIST = (
    "model", "U-MAE (uniformity term)", "optimisation", "augmentation (fine-tuning)", "data", "runtime",
    "checkpoints and logging", "distributed",
)


class DefaultMaskRatio(float):
    """`--mask_ratio` when it is not on the command line: equal to upstream's 0.75, but marked so
    that `check_args` can give SimMIM models their own 0.6. `check_args` turns it into a plain
    float before anything is logged or saved; a plain 0.75 (given, or set by hand) means 0.75."""

    def __new__(cls, value: float = 0.75) -> "DefaultMaskRatio":
        return super().__new__(cls, value)

    def __reduce__(self):  # pickles (submitit, deepcopy) as itself
        return (DefaultMaskRatio, (float(self),))


def new_parser(description: str) -> argparse.ArgumentParser:
    """A script's parser: no `-h` of its own (it is also used as a parent, as upstream's), defaults
    appended to every help string."""
    return argparse.ArgumentParser(description=description, add_help=False,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def groups(parser: argparse.ArgumentParser, *titles: str) -> dict[str, argparse._ArgumentGroup]:
    return {t: parser.add_argument_group(t) for t in titles}


def add_data_arguments(g: argparse._ArgumentGroup, data_path_help: str = "dataset path") -> None:
    g.add_argument("--dataset", default="imagefolder", choices=DATASETS,
                   help="imagefolder: <data_path>/train and <data_path>/val; cifar10: torchvision's, in "
                        "<data_path>; digits: scikit-learn's bundled 8x8 digits (no files needed)")
    g.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str, help=data_path_help)
    g.add_argument("--download", action="store_true", help="download CIFAR-10 into --data_path if absent")


def add_loader_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes per GPU process")
    g.add_argument("--pin_mem", action="store_true",
                   help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory")


def add_runtime_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--device", default="cuda", help="device to use for training / testing")
    g.add_argument("--seed", default=0, type=int, help="random seed (each process adds its rank)")
    g.add_argument("--amp", default=None, choices=list(AMP_DTYPES),
                   help="autocast dtype (None: bf16 on GPUs that support it, else full precision)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")


def add_logging_arguments(g: argparse._ArgumentGroup, resume_help: str) -> None:
    g.add_argument("--output_dir", default="./output_dir", help="path where to save, empty for no saving")
    g.add_argument("--log_dir", default="./output_dir", help="path where to tensorboard log")
    g.add_argument("--resume", default="", help=resume_help)
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    g.add_argument("--save_freq", default=20, type=int,
                   help="keep checkpoint-{epoch}.pth every N epochs and at the last one "
                        "(checkpoint-last.pth is written every epoch)")
    g.add_argument("--print_freq", default=20, type=int, help="log (and wait for the device) every N steps")


def add_distributed_arguments(g: argparse._ArgumentGroup) -> None:
    """Upstream's distributed flags. Under torchrun / submitit the environment decides; these
    apply on the set-up paths the reference has for them (`umae_plugin.distributed`)."""
    g.add_argument("--world_size", default=1, type=int,
                   help="number of distributed processes (used with SLURM_PROCID and --dist_url; "
                        "torchrun / submitit set it through the environment)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                   help="passed by torch.distributed.launch; the process's GPU is LOCAL_RANK")
    g.add_argument("--dist_on_itp", action="store_true",
                   help="OpenMPI launch: rank, world size and local rank from OMPI_COMM_WORLD_*, "
                        "init at tcp://MASTER_ADDR:MASTER_PORT")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")


def add_schedule_arguments(
    g: argparse._ArgumentGroup, *, batch_size: int, epochs: int, weight_decay: float, blr: float, min_lr: float,
    warmup_epochs: int, weight_decay_help: str = "weight decay",
) -> None:
    """Batch, epochs, accumulation and the lr schedule: the same flags in all three scripts, each
    with its own upstream defaults."""
    g.add_argument("--batch_size", default=batch_size, type=int,
                   help="Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus")
    g.add_argument("--epochs", default=epochs, type=int, help="training epochs")
    g.add_argument("--accum_iter", default=1, type=int,
                   help="Accumulate gradient iterations (for increasing the effective batch size under memory "
                        "constraints); the steps %% accum_iter batches left at an epoch's end are not applied")
    g.add_argument("--weight_decay", type=float, default=weight_decay, help=weight_decay_help)
    g.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (absolute lr)")
    g.add_argument("--blr", type=float, default=blr, metavar="LR",
                   help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    g.add_argument("--min_lr", type=float, default=min_lr, metavar="LR", help="lower lr bound for cyclic schedulers that hit 0")
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs, metavar="N", help="epochs to warmup LR")


def add_run_arguments(g: dict[str, argparse._ArgumentGroup], data_path_help: str = "dataset path") -> None:
    """Data, loader, runtime, checkpoint / logging and distributed flags, alike in all three scripts."""
    add_data_arguments(g[DATA], data_path_help)
    add_loader_arguments(g[DATA])
    g[DATA].set_defaults(pin_mem=True)
    add_runtime_arguments(g[RUN])
    add_logging_arguments(g[LOGGING], "resume from checkpoint, or 'auto' for the newest complete one in --output_dir")
    add_distributed_arguments(g[DIST])


def add_classification_arguments(g: dict[str, argparse._ArgumentGroup], global_pool: bool) -> None:
    """The flags `main_linprobe.py` and `main_finetune.py` share beyond the common ones: the
    encoder to start from, pooling, classes, and evaluation."""
    m = g[MODEL]
    m.add_argument("--patch_size", default=None, type=int,
                   help="patch size (None: the --finetune / --resume checkpoint's, else the model's)")
    m.add_argument("--finetune", default="", help="finetune from checkpoint (any MAE / U-MAE / timm format)")
    m.add_argument("--global_pool", action="store_true", help="average the patch tokens (then fc_norm) for classification")
    m.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="Use class token instead of global pool for classification")
    m.add_argument("--nb_classes", default=1000, type=int,
                   help="number of the classification types (digits / cifar10: taken from the dataset)")
    m.set_defaults(global_pool=global_pool)
    cli_run = g[RUN]
    cli_run.add_argument("--eval", action="store_true", help="Perform evaluation only")
    g[DIST].add_argument("--dist_eval", action="store_true", default=False,
                         help="Enabling distributed evaluation (shards val; else every process evaluates all of it)")


def ungrouped_actions(parser: argparse.ArgumentParser) -> list[str]:
    """Flags outside a named group (for tests: every flag belongs to one)."""
    default_groups = {id(parser._positionals), id(parser._optionals)}
    return [a.option_strings[0] for g in parser._action_groups if id(g) in default_groups
            for a in g._group_actions if not isinstance(a, argparse._HelpAction)]


def run_main(
    build_parser: Callable[[], argparse.ArgumentParser],
    main: Callable[[argparse.Namespace], Any],
    *,
    argv: list[str] | None = None,
) -> None:
    """`python main_<script>.py ...`: parse (with `-h`), run, and print a user error (any
    `errors.UserError`, or an `OSError` such as a log file that cannot be written) as one line
    `error: ...` with its exit status (2 usage, 1 runtime) instead of a traceback; argparse's own
    usage errors exit with 2 as always (`errors.one_line_errors`)."""
    parent = build_parser()
    parser = argparse.ArgumentParser(description=parent.description, parents=[parent],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(argv)
    with one_line_errors():
        main(args)
