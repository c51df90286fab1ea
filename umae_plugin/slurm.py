"""SLURM (and local) submission of the three scripts through submitit: what `submitit_launcher.py`
runs.

    python submitit_launcher.py {pretrain,linprobe,finetune} [launcher flags] [the script's flags]

Installed, the same command is `umae-submit {pretrain,linprobe,finetune} ...`. The script's flags
are those of `umae_plugin.<script>.get_args_parser()` (what `main_<script>.py` runs), reused as a
parent parser; the module is imported only for the subcommand asked for. Inside the job,
`ScriptJob` exports submitit's view of the allocation as torch's `RANK` / `WORLD_SIZE` /
`LOCAL_RANK` / `MASTER_ADDR` / `MASTER_PORT` (one task per GPU; `umae_plugin.distributed` then
picks NCCL on GPUs, gloo on CPUs) and calls the module's `main(args)`. The pickled job names the
package module, so it runs wherever the package is installed, checkout or not.

Folders. The job folder is `--job_dir`, else `$UMAE_JOB_DIR/%j` (a base folder shared by many runs,
so each run gets its own sub-folder); `%j` becomes the job id. The script's `--output_dir` and
`--log_dir` default to the job folder. A sweep gives each point its own sub-folder,
`<output_dir>/<dest>=<value>[,<dest>=<value>...]`; a SLURM job array keeps all points (and the
array's logs) under one folder named after the array's id.

Resuming. Unless `--resume` is given, jobs run with `--resume auto`: the script continues from the
newest complete checkpoint in its output folder, so resubmitting the same command with the same
fixed `--job_dir` continues the run, and a requeue after preemption or timeout (submitit's
`checkpoint()` protocol, below) finishes it with every epoch trained and logged exactly once. A
`--job_dir` containing `%j` starts fresh on every submission.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import itertools
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError, one_line_errors

SCRIPTS = ("pretrain", "linprobe", "finetune")
JOB_DIR_ENV = "UMAE_JOB_DIR"
CLUSTERS = ("slurm", "local", "debug")
SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: time to finish the step and requeue
MAX_NUM_TIMEOUT = 30  # requeues after a timeout (preemptions do not count): 800 epochs in 3-day slices
RECORD = "submissions.jsonl"  # the launcher's record, one line per submission, in each output folder


class LauncherError(UserError, RuntimeError):
    """A submission that cannot work, with the reason (one line; exit status 1)."""


# ---------------------------------------------------------------------------------------------
# command line


def launcher_parser() -> argparse.ArgumentParser:
    """The launcher's own flags (upstream's, less its site defaults, plus scheduler options)."""
    parser = argparse.ArgumentParser(add_help=False)
    g = parser.add_argument_group("launcher (submitit / SLURM)")
    g.add_argument("--nodes", default=None, type=int,
                   help="nodes to request (default: 2; 1 with --cluster local/debug)")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs per node; 0: CPU-only job (gloo, --device cpu)")
    g.add_argument("--tasks_per_node", default=None, type=int,
                   help="processes per node (default: --ngpus, one per GPU; 1 with --ngpus 0)")
    g.add_argument("--cpus_per_task", default=10, type=int, help="CPUs per process")
    g.add_argument("--mem_gb", default=None, type=float,
                   help="memory per node in GB (default: 40 * ngpus; 0: request none, the partition's default)")
    g.add_argument("--timeout", default=4320, type=int, help="time limit in minutes")
    g.add_argument("--job_dir", default="", type=str,
                   help=f"job folder for logs and, by default, outputs; %%j becomes the job id "
                        f"(default: ${JOB_DIR_ENV}/%%j)")
    g.add_argument("--partition", default=None, type=str, help="SLURM partition (default: the cluster's)")
    g.add_argument("--account", default=None, type=str)
    g.add_argument("--qos", default=None, type=str)
    g.add_argument("--constraint", default=None, type=str, help="SLURM node features, e.g. 'volta32gb'")
    g.add_argument("--use_volta32", action="store_true", help="add the constraint volta32gb")
    g.add_argument("--exclude", default=None, type=str, help="nodes not to run on")
    g.add_argument("--comment", default="", type=str, help="comment for the SLURM job")
    g.add_argument("--mail_user", default=None, type=str, help="send SLURM's e-mails here")
    g.add_argument("--mail_type", default="END,FAIL", type=str, help="which e-mails (with --mail_user)")
    g.add_argument("--job_name", default=None, type=str, help="job name (default: umae_<script>)")
    g.add_argument("--cluster", default="slurm", choices=CLUSTERS,
                   help="submitit executor: slurm, local (subprocesses on this machine) or debug (in-process)")
    g.add_argument("--sweep", action="append", default=[], metavar="DEST=V1,V2,...",
                   help="run one job per value of a script flag (by its dest name), as one job array; "
                        "repeat for a grid (cartesian product); each point gets <output_dir>/<DEST>=<V>/")
    g.add_argument("--wait", action="store_true", help="wait for the jobs to end and report their outcome")
    g.add_argument("--dry_run", action="store_true", help="print the submission, submit nothing")
    return parser


def top_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="submitit_launcher.py",
        usage="%(prog)s {pretrain,linprobe,finetune} [launcher flags] [script flags]",
        description="Submit main_pretrain.py, main_linprobe.py or main_finetune.py to SLURM (or run it "
                    "locally) through submitit. `%(prog)s pretrain --help` lists a script's flags.",
    )


def import_script(name: str):
    """The package module of script `name`: `umae_plugin.pretrain`, `.linprobe` or `.finetune`
    (`get_args_parser`, `check_args`, `main`; `main_<name>.py` re-exports them)."""
    if name not in SCRIPTS:
        raise LauncherError(f"unknown script {name!r}; choose from {', '.join(SCRIPTS)}")
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(name: str) -> argparse.ArgumentParser:
    """The launcher's flags plus the script's, for one subcommand."""
    script = import_script(name)
    try:
        parser = argparse.ArgumentParser(
            prog=f"submitit_launcher.py {name}",
            parents=[launcher_parser(), script.get_args_parser()],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            description=f"Submit main_{name}.py through submitit; every flag of main_{name}.py is accepted.",
            epilog="In the job, --output_dir and --log_dir default to the job folder, and --resume to 'auto' "
                   "(continue from the newest checkpoint in --output_dir: requeues and resubmissions "
                   "with the same --job_dir pick up where the run stopped).",
        )
    except argparse.ArgumentError as err:
        raise LauncherError(f"main_{name}.py declares a flag the launcher also uses: {err}") from err
    # None = "not given": the job folder fills them in (`job_arguments`).
    parser.set_defaults(**{d: None for d in ("output_dir", "log_dir") if has_dest(parser, d)})
    return parser


def has_dest(parser: argparse.ArgumentParser, dest: str) -> bool:
    return any(a.dest == dest for a in parser._actions)


def parse_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> tuple[str, argparse.Namespace]:
    """`[script, launcher and script flags...]` -> (script, checked arguments). Bad values exit with
    argparse's usage message (status 2), as a script's own parser would."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        top_parser().print_help()
        raise SystemExit(0 if argv else 2)
    if argv[0] not in SCRIPTS:
        top_parser().error(f"the first argument names the script: one of {', '.join(SCRIPTS)} (got {argv[0]!r})")
    name = argv[0]
    try:
        parser = build_parser(name)
    except LauncherError as err:
        top_parser().error(str(err))
    args = parser.parse_args(argv[1:])
    if args.job_name is None:
        args.job_name = f"umae_{name}"
    check_args(parser, args, os.environ if environ is None else environ)
    args._sweep = expand_sweep(parser, args.sweep)  # validated here, applied in `job_arguments`
    args._script_defaults = {d: parser.get_default(d) for d in ("resume", "device") if has_dest(parser, d)}
    return name, args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, environ: dict[str, str]) -> None:
    """Resolve the launcher's defaults and refuse combinations that cannot work."""
    if args.nodes is None:
        args.nodes = 2 if args.cluster == "slurm" else 1
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    if args.ngpus < 0:
        parser.error(f"--ngpus must be >= 0 (0: CPU-only), got {args.ngpus}")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.ngpus if args.ngpus > 0 else 1
    if args.tasks_per_node < 1:
        parser.error(f"--tasks_per_node must be >= 1, got {args.tasks_per_node}")
    if args.ngpus > 0 and args.tasks_per_node > args.ngpus:
        parser.error(f"--tasks_per_node {args.tasks_per_node} > --ngpus {args.ngpus}: each process drives the "
                     f"GPU of its local rank, so at most one process per GPU (or --ngpus 0 for CPU processes)")
    if 0 < args.tasks_per_node < args.ngpus:
        warnings.warn(f"--tasks_per_node {args.tasks_per_node} < --ngpus {args.ngpus}: "
                      f"{args.ngpus - args.tasks_per_node} GPU(s) per node will sit idle", stacklevel=2)
    if args.cpus_per_task < 1:
        parser.error(f"--cpus_per_task must be >= 1, got {args.cpus_per_task}")
    if args.timeout <= 0:
        parser.error(f"--timeout is in minutes and must be > 0, got {args.timeout}")
    if args.mem_gb is None:
        args.mem_gb = 40.0 * args.ngpus
    if args.mem_gb < 0:
        parser.error(f"--mem_gb must be >= 0 (0: request none), got {args.mem_gb}")
    if args.cluster == "local" and args.nodes > 1:
        parser.error(f"--cluster local runs on this machine only: --nodes must be 1, got {args.nodes}")
    if args.cluster == "debug" and args.nodes * args.tasks_per_node > 1:
        parser.error("--cluster debug runs one process in this one: use --nodes 1 --tasks_per_node 1 "
                     "(or --cluster local for several processes)")
    try:
        args.job_dir = resolve_job_dir(args.job_dir, environ)
    except LauncherError as err:
        parser.error(str(err))


def resolve_job_dir(job_dir: str, environ: dict[str, str]) -> str:
    """`--job_dir` as given (made absolute), else `$UMAE_JOB_DIR/%j`."""
    if not job_dir:
        base = environ.get(JOB_DIR_ENV, "")
        if not base:
            raise LauncherError(f"no job folder: pass --job_dir DIR (%j in it becomes the job id) or set "
                                f"{JOB_DIR_ENV} to a folder shared by the cluster's nodes")
        job_dir = base if "%j" in base else os.path.join(base, "%j")
    return str(Path(job_dir).expanduser().absolute())


# ---------------------------------------------------------------------------------------------
# sweeps


@dataclasses.dataclass(frozen=True)
class SweepAxis:
    dest: str
    raw: tuple[str, ...]  # as typed: they name the folders
    values: tuple[Any, ...]  # parsed with the flag's own type


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_NOT_SWEEPABLE = {"output_dir", "log_dir"}  # each point gets its own folder anyway


def expand_sweep(parser: argparse.ArgumentParser, specs: Sequence[str]) -> list[SweepAxis]:
    """`["lambda_unif=0,0.01", "blr=1e-4,1e-3"]` -> one axis per spec, values parsed and checked
    with the flag's own type and choices. Launcher flags cannot be swept."""
    launcher_dests = {a.dest for a in launcher_parser()._actions}
    by_name: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.dest in launcher_dests or action.dest == "help":
            continue
        names = {action.dest} | {s.lstrip("-") for s in action.option_strings}
        for n in names:
            by_name.setdefault(n, []).append(action)
    axes: list[SweepAxis] = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip().lstrip("-")
        if not sep or not name or not text.strip():
            parser.error(f"--sweep {spec!r}: expected DEST=V1,V2,... (e.g. --sweep lambda_unif=0,0.01)")
        actions = by_name.get(name)
        if not actions:
            hint = " (a launcher flag: not sweepable)" if name in launcher_dests else ""
            parser.error(f"--sweep {spec!r}: {name!r} is not a flag of this script{hint}")
        dest = actions[0].dest
        if name != dest and all(a.nargs == 0 for a in actions):  # --no_pin_mem=true would mean pin_mem False
            parser.error(f"--sweep {spec!r}: sweep a switch by the value it stores: {dest}=true,false")
        if dest in _NOT_SWEEPABLE:
            parser.error(f"--sweep {spec!r}: every sweep point already gets its own {dest} sub-folder")
        if any(a.dest == dest for a in axes):
            parser.error(f"--sweep: {dest} is swept twice")
        raw = tuple(v.strip() for v in text.split(","))
        if any(not v for v in raw):
            parser.error(f"--sweep {spec!r}: empty value in the list")
        values = tuple(_parse_value(parser, actions, spec, v) for v in raw)
        if len(set(map(repr, values))) != len(values):
            parser.error(f"--sweep {spec!r}: a value is repeated")
        axes.append(SweepAxis(dest, raw, values))
    return axes


def _parse_value(parser: argparse.ArgumentParser, actions: list[argparse.Action], spec: str, text: str) -> Any:
    flag = actions[0].option_strings[0] if actions[0].option_strings else actions[0].dest
    if all(a.nargs == 0 for a in actions):  # store_true / store_false flags: sweep the stored bool
        if any(not isinstance(a.const, bool) for a in actions):
            parser.error(f"--sweep {spec!r}: {flag} stores a constant and cannot be swept")
        if text.lower() not in _TRUE | _FALSE:
            parser.error(f"--sweep {spec!r}: {text!r} is not a boolean for {flag} (use true/false)")
        return text.lower() in _TRUE
    action = next(a for a in actions if a.nargs != 0)
    if action.nargs not in (None, "?"):
        parser.error(f"--sweep {spec!r}: {flag} takes several values and cannot be swept")
    convert = action.type if callable(action.type) else str
    try:
        value = convert(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        name = getattr(convert, "__name__", repr(convert))
        parser.error(f"--sweep {spec!r}: {text!r} is not a valid {name} for {flag} ({err})")
    if action.choices is not None and value not in action.choices:
        parser.error(f"--sweep {spec!r}: {text!r} is not one of {flag}'s choices {list(action.choices)}")
    return value


def sweep_points(axes: Sequence[SweepAxis]) -> list[tuple[str, dict[str, Any]]]:
    """Cartesian product of the axes: [(folder name, {dest: value})]; [("", {})] without a sweep."""
    points = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        name = ",".join(f"{a.dest}={a.raw[i]}".replace(os.sep, "_") for a, i in zip(axes, combo))
        points.append((name, {a.dest: a.values[i] for a, i in zip(axes, combo)}))
    return points


# ---------------------------------------------------------------------------------------------
# what each job runs


def script_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The script's own namespace: the launcher's flags removed."""
    launcher = {a.dest for a in launcher_parser()._actions}
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in launcher and not k.startswith("_")})


def job_arguments(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """One (sweep point, script namespace) per job, folders and CPU/resume defaults filled in.
    Paths may still hold `%j`: the job replaces it with its id (`expand_job_id`)."""
    base = script_arguments(args)
    defaults = getattr(args, "_script_defaults", {})
    if "device" in defaults and args.ngpus == 0 and str(base.device).startswith("cuda"):
        base.device = "cpu"
    if "resume" in defaults and base.resume == defaults["resume"]:
        base.resume = "auto"  # a requeue or a resubmission continues from the output folder
    out_root = _absolute(base.output_dir) if getattr(base, "output_dir", None) else args.job_dir
    log_root = _absolute(base.log_dir) if getattr(base, "log_dir", None) else None
    jobs = []
    for name, overrides in sweep_points(getattr(args, "_sweep", [])):
        ns = copy.deepcopy(base)
        for k, v in overrides.items():
            setattr(ns, k, v)
        if hasattr(ns, "output_dir"):
            ns.output_dir = os.path.join(out_root, name) if name else out_root
        if hasattr(ns, "log_dir"):
            ns.log_dir = (os.path.join(log_root, name) if name else log_root) if log_root else ns.output_dir
        jobs.append((name, ns))
    return jobs


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def expand_job_id(path: str | None, job_id: str) -> str | None:
    return path.replace("%j", job_id) if path else path


@dataclasses.dataclass
class ScriptJob:
    """The picklable callable submitit runs in every task: `umae_plugin.<script>.main(args)` under
    torch's distributed environment. `checkpoint()` is submitit's requeue hook (preemption, timeout)."""

    script: str
    args: argparse.Namespace
    cpus_per_task: int = 1

    def __call__(self) -> Any:
        import submitit
        import torch

        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # Every process sees all the node's GPUs and takes the one of its local rank, as
        # `umae_plugin.runtime.resolve_device` expects; overwrite what sbatch copied from the
        # submitting shell (a job launched from inside a torchrun or SLURM job).
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        threads = torch.get_num_threads()
        if "OMP_NUM_THREADS" not in os.environ:  # torch would start one thread per core of the node
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, min(self.cpus_per_task, cores // max(1, dist_env.local_world_size))))
        args = self.resolved_args()
        for dest, value in (("world_size", dist_env.world_size), ("local_rank", dist_env.local_rank)):
            if hasattr(args, dest):
                setattr(args, dest, value)
        print(f"{time.strftime('%H:%M:%S')} umae {self.script}: job {job_folder_id()}, rank {dist_env.rank} "
              f"of world size {dist_env.world_size} (local rank {dist_env.local_rank}) on {socket.gethostname()}, "
              f"master {dist_env.master_addr}:{dist_env.master_port}, output_dir "
              f"{getattr(args, 'output_dir', None)}, resume {getattr(args, 'resume', None)!r}", flush=True)
        script = import_script(self.script)
        try:
            return script.main(args)
        except Exception as err:
            exiting = _pending_exit(err)
            if exiting is not None:
                # submitit's requeue handler exits with SystemExit from wherever the signal landed;
                # clean-up code on the way out (a `with` around torch.save) may turn that into an
                # error, which submitit would record as the job's failed result. Finish the exit.
                raise exiting from err
            raise
        finally:  # leave the process as found: `--cluster debug` runs jobs in the launcher's process
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            torch.set_num_threads(threads)

    def resolved_args(self) -> argparse.Namespace:
        """A copy of the arguments with `%j` replaced (the script may modify its copy freely)."""
        args = copy.deepcopy(self.args)
        job_id = job_folder_id()
        for dest in ("output_dir", "log_dir"):
            if hasattr(args, dest):
                setattr(args, dest, expand_job_id(getattr(args, dest), job_id))
        return args

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue with `--resume auto`: the script continues from the newest complete checkpoint in
        its output folder. A `--resume FILE` is kept until the output folder holds a checkpoint."""
        import submitit

        from .checkpoint import find_latest_checkpoint

        new_args = copy.deepcopy(self.args)
        if hasattr(new_args, "resume") and new_args.resume != "auto":
            out = self.resolved_args().output_dir
            if out and Path(out).is_dir() and find_latest_checkpoint(out) is not None:
                new_args.resume = "auto"
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, args=new_args))


def _pending_exit(err: BaseException) -> SystemExit | None:
    """The SystemExit `err` was raised while handling, if any."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, SystemExit):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def job_folder_id() -> str:
    """What `%j` becomes inside a job: the job id, or for a SLURM array the array's id (so all
    points of a sweep share one folder)."""
    import submitit

    env = submitit.JobEnvironment()
    return str(env.array_job_id or env.raw_job_id)


# ---------------------------------------------------------------------------------------------
# submission


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """`AutoExecutor.update_parameters` keywords: shared ones, and SLURM-only ones (`slurm_`)."""
    params: dict[str, Any] = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
    )
    if args.ngpus > 0:
        params["gpus_per_node"] = args.ngpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    constraint = "&".join(c for c in (args.constraint, "volta32gb" if args.use_volta32 else None) if c)
    slurm = dict(partition=args.partition, account=args.account, qos=args.qos, constraint=constraint,
                 exclude=args.exclude, comment=args.comment, mail_user=args.mail_user,
                 mail_type=args.mail_type if args.mail_user else None)
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
    return params


def make_executor(args: argparse.Namespace, folder: str | None = None):
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=folder or args.job_dir, cluster=args.cluster,
                                         slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    except RuntimeError as err:
        if args.cluster == "slurm":
            raise LauncherError(f"--cluster slurm needs SLURM (srun and sbatch on PATH): {err}. "
                                f"On a machine without SLURM use --cluster local") from err
        raise
    executor.update_parameters(**executor_parameters(args))
    return executor


def submission_text(executor, n_jobs: int = 1) -> str:
    """The sbatch script a SLURM executor would submit for `n_jobs` jobs (an array when > 1), as
    submitit writes it; the parameters as JSON for the other executors."""
    inner = executor._executor
    if inner.name() != "slurm":
        return json.dumps(inner.parameters, indent=2, sort_keys=True, default=str)
    from submitit.slurm.slurm import _make_sbatch_string  # private: what SlurmExecutor itself calls

    params = dict(inner.parameters)
    if n_jobs > 1:
        params["map_count"] = n_jobs
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **params)


def executor_folder(args: argparse.Namespace, n_jobs: int) -> str:
    # SLURM runs several jobs as one array: `%A` (the array's id) keeps its logs in one folder,
    # where `job_folder_id` also puts the points' output folders.
    if n_jobs > 1 and args.cluster == "slurm":
        return args.job_dir.replace("%j", "%A")
    return args.job_dir


def submit(script: str, args: argparse.Namespace,
           argv: Sequence[str] | None = None) -> list[tuple[Any, str, argparse.Namespace]]:
    """Submit one job (or one array for a sweep); returns (submitit Job, sweep point, script
    arguments) per job."""
    module = import_script(script)
    points = job_arguments(args)
    for _, ns in points:  # refuse bad script flags here, not after the queue
        module.check_args(module.get_args_parser(), copy.deepcopy(ns))
    executor = make_executor(args, executor_folder(args, len(points)))
    fns = [ScriptJob(script, ns, args.cpus_per_task) for _, ns in points]
    jobs = executor.submit_array(fns) if len(fns) > 1 else [executor.submit(fns[0])]
    for job, (name, ns) in zip(jobs, points):
        write_record(job, name, ns, args, script, argv)
    return [(job, name, ns) for job, (name, ns) in zip(jobs, points)]


def output_folder_id(job, cluster: str) -> str:
    """`job_folder_id()` seen from the submitting side."""
    return job.job_id.split("_")[0] if cluster == "slurm" else job.job_id


def write_record(job, point: str, ns: argparse.Namespace, args: argparse.Namespace, script: str,
                 argv: Sequence[str] | None) -> Path | None:
    out = expand_job_id(getattr(ns, "output_dir", None), output_folder_id(job, args.cluster))
    if not out:
        return None
    record = dict(
        submitted=datetime.datetime.now().isoformat(timespec="seconds"),
        host=socket.gethostname(),
        script=script,
        argv=list(argv) if argv is not None else None,
        job_id=job.job_id,
        cluster=args.cluster,
        job_folder=str(job.paths.folder),
        stdout=str(job.paths.stdout),
        sweep_point=point or None,
        executor=executor_parameters(args),
        args=vars(ns),
    )
    path = Path(out) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    return path


def describe(job, ns: argparse.Namespace, point: str, cluster: str) -> str:
    out = expand_job_id(getattr(ns, "output_dir", None), output_folder_id(job, cluster))
    where = f" [{point}]" if point else ""
    return f"job {job.job_id}{where}: output {out}, log {job.paths.stdout}"


def main(argv: Sequence[str]) -> int:
    """`submitit_launcher.py` / `umae-submit`: the exit status (0 submitted, or with --wait all jobs
    done; 1 a job failed or the scheduler refused). A user error (a `LauncherError`, a script's `UserError`, an
    `OSError` writing the record) prints one line `error: ...` and exits with its status
    (`errors.one_line_errors`); bad flags exit with argparse's usage message (status 2)."""
    with one_line_errors():
        return _main(argv)


def entry() -> None:
    """`umae-submit`: `main(sys.argv[1:])` as the exit status."""
    sys.exit(main(sys.argv[1:]))


def _main(argv: Sequence[str]) -> int:
    import submitit

    argv = list(argv)
    script, args = parse_args(argv)
    try:
        if args.dry_run:
            points = job_arguments(args)
            executor = make_executor(args, executor_folder(args, len(points)))
            print(submission_text(executor, len(points)))
            for name, ns in points:
                print(f"# {name or 'job'}: {json.dumps(vars(ns), sort_keys=True, default=str)}")
            return 0
        submitted = submit(script, args, argv)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        print(f"error: the scheduler refused the job ({args.cluster}):\n{err}", file=sys.stderr)
        return 1
    kind = f"{len(submitted)} jobs (one array)" if len(submitted) > 1 else "job"
    print(f"Submitted {script} as {kind} to {args.cluster}: {args.nodes} node(s) x {args.tasks_per_node} "
          f"task(s), {args.ngpus} GPU(s) per node")
    for job, name, ns in submitted:
        print("  " + describe(job, ns, name, args.cluster))
    if args.wait or args.cluster == "debug":  # debug jobs run in this process, when asked for results
        failed = 0
        for job, _, _ in submitted:
            try:
                job.results()
                print(f"job {job.job_id}: done")
            except Exception as err:  # report every job, then fail
                failed += 1
                print(f"job {job.job_id}: failed: {err}", file=sys.stderr)
        return 1 if failed else 0
    return 0
