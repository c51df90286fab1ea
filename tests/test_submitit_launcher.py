"""submitit_launcher.py without a cluster: parsing, validation, the sbatch script submitit would
submit, sweeps, folders, the requeue hook, and one job run in-process (`--cluster debug`)."""
import argparse
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import submitit

import submitit_launcher
from umae_plugin import checkpoint as ckpt
from umae_plugin import slurm

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_PRETRAIN = ("--job_dir J --nodes 8 --use_volta32 --batch_size 64 --model mae_vit_large_patch16 "
                     "--norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 "
                     "--weight_decay 0.05 --data_path /imagenet").split()
UPSTREAM_LINPROBE = ("--job_dir J --nodes 2 --batch_size 512 --model vit_base_patch16 --cls_token "
                     "--finetune /ckpt/mae_pretrain_vit_base.pth --epochs 90 --blr 0.1 --weight_decay 0.0 "
                     "--dist_eval --data_path /imagenet").split()
UPSTREAM_FINETUNE = ("--job_dir J --nodes 4 --batch_size 32 --model vit_base_patch16 "
                     "--finetune /ckpt/mae_pretrain_vit_base.pth --epochs 100 --blr 5e-4 --layer_decay 0.65 "
                     "--weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval "
                     "--data_path /imagenet").split()


def parse(*argv, env=None):
    return slurm.parse_args(list(argv), environ={} if env is None else env)


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """submitit's SLURM executor only checks that `srun` is on PATH; nothing is submitted here."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    sbatch = bin_dir / "sbatch"  # a cluster that refuses everything
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: Memory specification can not be satisfied' >&2\nexit 1\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def sbatch(*argv, n_jobs=1):
    _, args = parse(*argv)
    return slurm.submission_text(slurm.make_executor(args, slurm.executor_folder(args, n_jobs)), n_jobs)


def sbatch_flags(text):
    return {line.split("=", 1)[0][len("#SBATCH "):]: line.split("=", 1)[1] if "=" in line else True
            for line in text.splitlines() if line.startswith("#SBATCH ")}


# ---------------------------------------------------------------------------------------------
# parsing


def test_upstream_pretrain_command_parses_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, args = parse("pretrain", *UPSTREAM_PRETRAIN)
    assert name == "pretrain"
    assert (args.nodes, args.ngpus, args.tasks_per_node, args.timeout) == (8, 8, 8, 4320)
    assert args.use_volta32 and args.partition is None and args.cpus_per_task == 10 and args.mem_gb == 320
    assert args.job_dir == str(tmp_path / "J")
    assert (args.batch_size, args.model, args.norm_pix_loss, args.mask_ratio) == (64, "mae_vit_large_patch16", True, 0.75)
    assert (args.epochs, args.warmup_epochs, args.blr, args.weight_decay) == (800, 40, 1.5e-4, 0.05)
    assert args.data_path == "/imagenet"
    [(point, ns)] = slurm.job_arguments(args)
    assert point == "" and ns.output_dir == ns.log_dir == str(tmp_path / "J")
    assert ns.resume == "auto" and ns.device == "cuda"
    assert not hasattr(ns, "nodes") and not hasattr(ns, "sweep")  # the script sees its own flags only


@pytest.mark.parametrize("script,argv", [("linprobe", UPSTREAM_LINPROBE), ("finetune", UPSTREAM_FINETUNE)])
def test_upstream_linprobe_and_finetune_commands_parse(script, argv):
    if not (ROOT / f"main_{script}.py").exists():
        pytest.skip(f"main_{script}.py is not in this checkout yet")
    name, args = parse(script, *argv)
    assert name == script and args.finetune == "/ckpt/mae_pretrain_vit_base.pth" and args.data_path == "/imagenet"
    assert args.nodes == int(argv[argv.index("--nodes") + 1])


def test_root_script_exposes_parse_args():
    name, args = submitit_launcher.parse_args(["pretrain", "--job_dir", "/j/%j", "--nodes", "1"])
    assert name == "pretrain" and args.job_dir == "/j/%j" and args.nodes == 1


def test_help_lists_launcher_and_script_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("pretrain", "--help")
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--use_volta32" in out and "--lambda_unif" in out and "--sweep" in out


@pytest.mark.parametrize("argv,message", [
    ([], "usage"),
    (["pretrian", "--nodes", "1"], "first argument names the script"),
    (["--nodes", "1", "pretrain"], "first argument names the script"),
])
def test_subcommand_is_required(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv, env={"UMAE_JOB_DIR": "/j"})
    captured = capsys.readouterr()
    assert exc.value.code == 2 and message in captured.err + captured.out


def test_jobs_run_the_package_modules_not_the_checkout_scripts():
    import umae_plugin.linprobe

    assert slurm.import_script("linprobe") is umae_plugin.linprobe
    with pytest.raises(slurm.LauncherError, match="unknown script 'nope'"):
        slurm.import_script("nope")
    # the pickled job names the package module: it runs where the package is installed, no checkout needed
    job = pickle.dumps(slurm.ScriptJob("linprobe", argparse.Namespace()))
    assert b"umae_plugin.slurm" in job and b"main_linprobe" not in job


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("extra,message", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--tasks_per_node", "0"], "--tasks_per_node must be >= 1"),
    (["--ngpus", "-1"], "--ngpus must be >= 0"),
    (["--ngpus", "2", "--tasks_per_node", "4"], "at most one process per GPU"),
    (["--timeout", "0"], "--timeout is in minutes and must be > 0"),
    (["--cpus_per_task", "0"], "--cpus_per_task must be >= 1"),
    (["--mem_gb", "-4"], "--mem_gb must be >= 0"),
    (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"),
    (["--cluster", "debug", "--nodes", "1", "--ngpus", "0", "--tasks_per_node", "2"], "--cluster debug runs one process"),
    (["--sweep", "no_such_flag=1,2"], "'no_such_flag' is not a flag of this script"),
    (["--sweep", "nodes=1,2"], "a launcher flag"),
    (["--sweep", "lambda_unif=0,abc"], "'abc' is not a valid float for --lambda_unif"),
    (["--sweep", "epochs=10,2.5"], "'2.5' is not a valid int for --epochs"),
    (["--sweep", "reg=none,bogus"], "not one of --reg's choices"),
    (["--sweep", "lambda_unif"], "expected DEST=V1,V2"),
    (["--sweep", "lambda_unif=0,,1"], "empty value"),
    (["--sweep", "lambda_unif=0.1,0.10"], "repeated"),
    (["--sweep", "blr=1e-3", "--sweep", "blr=1e-4"], "blr is swept twice"),
    (["--sweep", "output_dir=a,b"], "own output_dir sub-folder"),
    (["--sweep", "norm_pix_loss=true,maybe"], "not a boolean"),
    (["--sweep", "no_pin_mem=true,false"], "pin_mem=true,false"),
    (["--cluster", "pbs"], "invalid choice"),
])
def test_bad_combinations_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse("pretrain", "--job_dir", "/j", *extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_local_and_debug_default_to_one_node():
    assert parse("pretrain", "--job_dir", "/j")[1].nodes == 2  # upstream's default on SLURM
    assert parse("pretrain", "--job_dir", "/j", "--cluster", "local", "--ngpus", "0")[1].nodes == 1
    assert parse("pretrain", "--job_dir", "/j", "--cluster", "debug", "--ngpus", "0")[1].nodes == 1


def test_fewer_tasks_than_gpus_warns():
    with pytest.warns(UserWarning, match="GPU\\(s\\) per node will sit idle"):
        _, args = parse("pretrain", "--job_dir", "/j", "--ngpus", "8", "--tasks_per_node", "4")
    assert args.tasks_per_node == 4


def test_bad_script_flags_are_refused_before_submission(tmp_path, capsys):
    _, args = parse("pretrain", "--job_dir", str(tmp_path), "--cluster", "debug", "--nodes", "1",
                    "--ngpus", "0", "--mask_ratio", "1.5")
    with pytest.raises(SystemExit):
        slurm.submit("pretrain", args)
    assert "--mask_ratio must be in [0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# folders


def test_job_dir_falls_back_to_the_environment(tmp_path):
    _, args = parse("pretrain", env={"UMAE_JOB_DIR": str(tmp_path)})
    assert args.job_dir == str(tmp_path / "%j")  # a shared base folder: one sub-folder per job
    _, args = parse("pretrain", env={"UMAE_JOB_DIR": str(tmp_path / "run_%j")})
    assert args.job_dir == str(tmp_path / "run_%j")
    _, args = parse("pretrain", "--job_dir", str(tmp_path / "fixed"), env={"UMAE_JOB_DIR": "/elsewhere"})
    assert args.job_dir == str(tmp_path / "fixed")


def test_missing_job_dir_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("pretrain", "--nodes", "1", env={})
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no job folder" in err and "--job_dir" in err and "UMAE_JOB_DIR" in err


def test_explicit_output_and_log_dirs_and_resume_are_kept(tmp_path):
    _, args = parse("pretrain", "--job_dir", str(tmp_path / "%j"), "--output_dir", str(tmp_path / "out"),
                    "--log_dir", str(tmp_path / "tb"), "--resume", "/ckpt/x.pth", "--ngpus", "0", "--device", "cuda:0")
    [(_, ns)] = slurm.job_arguments(args)
    assert (ns.output_dir, ns.log_dir, ns.resume) == (str(tmp_path / "out"), str(tmp_path / "tb"), "/ckpt/x.pth")
    assert ns.device == "cpu"  # --ngpus 0: a CPU job


def test_sweep_expands_into_a_grid_of_folders(tmp_path):
    _, args = parse("pretrain", "--job_dir", str(tmp_path / "%j"), "--sweep", "lambda_unif=0,0.001",
                    "--sweep", "norm_pix_loss=false,true", "--sweep", "epochs=3")
    points = slurm.job_arguments(args)
    names = [p for p, _ in points]
    assert names == ["lambda_unif=0,norm_pix_loss=false,epochs=3", "lambda_unif=0,norm_pix_loss=true,epochs=3",
                     "lambda_unif=0.001,norm_pix_loss=false,epochs=3", "lambda_unif=0.001,norm_pix_loss=true,epochs=3"]
    values = [(ns.lambda_unif, ns.norm_pix_loss, ns.epochs) for _, ns in points]
    assert values == [(0.0, False, 3), (0.0, True, 3), (0.001, False, 3), (0.001, True, 3)]
    assert all(isinstance(v[0], float) for v in values)
    for name, ns in points:
        assert ns.output_dir == ns.log_dir == str(tmp_path / "%j" / name)
    assert len({ns.output_dir for _, ns in points}) == 4


def test_sweep_accepts_option_aliases_and_user_output_dir(tmp_path):
    _, args = parse("pretrain", "--job_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                    "--sweep", "lamb=0.1,0.2")
    assert [ns.output_dir for _, ns in slurm.job_arguments(args)] == [
        str(tmp_path / "out" / "lambda_unif=0.1"), str(tmp_path / "out" / "lambda_unif=0.2")]


# ---------------------------------------------------------------------------------------------
# the submission


def test_sbatch_script_carries_the_request(tmp_path, fake_srun):
    flags = sbatch_flags(sbatch("pretrain", "--job_dir", str(tmp_path / "%j"), "--nodes", "2", "--ngpus", "8", "--timeout", "60",
                   "--partition", "gpu", "--account", "proj", "--qos", "high", "--constraint", "ib",
                   "--use_volta32", "--exclude", "node[1-2]", "--comment", "umae run", "--mail_user", "a@b.c"))
    assert flags["--nodes"] == "2" and flags["--ntasks-per-node"] == "8" and flags["--gpus-per-node"] == "8"
    assert flags["--cpus-per-task"] == "10" and flags["--mem"] == "320GB" and flags["--time"] == "60"
    assert flags["--partition"] == "gpu" and flags["--account"] == "proj" and flags["--qos"] == "high"
    assert flags["--constraint"] == "'ib&volta32gb'" and flags["--exclude"] == "'node[1-2]'"
    assert flags["--comment"] == "'umae run'" and flags["--mail-user"] == "a@b.c" and flags["--mail-type"] == "END,FAIL"
    assert flags["--signal"] == "USR2@120" and flags["--job-name"] == "umae_pretrain"
    assert flags["--output"] == str(tmp_path / "%j" / "%j_0_log.out")
    assert "--array" not in flags


def test_sbatch_script_for_a_cpu_job_requests_no_gpus(tmp_path, fake_srun):
    flags = sbatch_flags(sbatch("pretrain", "--job_dir", str(tmp_path), "--nodes", "1", "--ngpus", "0", "--cpus_per_task", "1"))
    assert "--gpus-per-node" not in flags and "--mem" not in flags and "--partition" not in flags
    assert flags["--ntasks-per-node"] == "1" and flags["--cpus-per-task"] == "1"
    assert not any(k in flags for k in ("--account", "--qos", "--constraint", "--comment", "--mail-user"))


def test_sbatch_memory_override(tmp_path, fake_srun):
    assert "--mem" not in sbatch("pretrain", "--job_dir", str(tmp_path), "--ngpus", "8", "--mem_gb", "0")
    assert sbatch_flags(sbatch("pretrain", "--job_dir", str(tmp_path), "--ngpus", "0", "--mem_gb", "2.5"))["--mem"] == "2560MB"


def test_sweep_is_one_array_with_its_logs_in_one_folder(tmp_path, fake_srun):
    text = sbatch("pretrain", "--job_dir", str(tmp_path / "%j"), "--sweep", "lambda_unif=0,0.01,0.1", n_jobs=3)
    flags = sbatch_flags(text)
    assert flags["--array"] == "0-2%3"
    assert flags["--output"] == str(tmp_path / "%A" / "%A_%a_0_log.out")
    assert f"_submit {tmp_path / '%A'}" in text


def test_a_refused_submission_is_reported(tmp_path, fake_srun, capsys):
    argv = ["pretrain", "--job_dir", str(tmp_path), "--ngpus", "0", "--mem_gb", "4096", "--dataset", "digits"]
    assert slurm.main(argv) == 1
    err = capsys.readouterr().err
    assert "the scheduler refused the job" in err and "Memory specification can not be satisfied" in err


def test_slurm_without_srun_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    _, args = parse("pretrain", "--job_dir", str(tmp_path))
    with pytest.raises(slurm.LauncherError, match="--cluster local"):
        slurm.make_executor(args)


def test_requeue_resumes_from_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    _, args = parse("pretrain", "--job_dir", str(tmp_path / "%j"), "--nodes", "1", "--ngpus", "0",
                    "--resume", str(tmp_path / "pretrained.pth"))
    [(_, ns)] = slurm.job_arguments(args)
    job = slurm.ScriptJob("pretrain", ns, 1)
    assert job.resolved_args().output_dir == str(tmp_path / "42")

    # No checkpoint of its own yet: the requeued job starts again from the user's file.
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and type(delayed.function) is slurm.ScriptJob
    assert delayed.function.args.resume == str(tmp_path / "pretrained.pth")

    (tmp_path / "42").mkdir()
    ckpt.save_atomic({"epoch": 3}, tmp_path / "42" / "checkpoint-last.pth")
    requeued = job.checkpoint().function
    assert requeued.args.resume == "auto" and requeued.args.output_dir == str(tmp_path / "%j")
    assert job.args.resume == str(tmp_path / "pretrained.pth")  # the original is untouched
    again = pickle.loads(pickle.dumps(requeued))  # submitit pickles it for the requeued job
    assert again == requeued


def test_debug_cluster_runs_the_script_in_process(tmp_path, capsys):
    job_dir = tmp_path / "job"
    argv = ["pretrain", "--cluster", "debug", "--job_dir", str(job_dir), "--nodes", "1", "--ngpus", "0",
            "--cpus_per_task", "1", "--model", "mae_vit_micro", "--dataset", "digits", "--input_size", "32",
            "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "256", "--num_workers", "0",
            "--print_freq", "5", "--erank_samples", "20"]
    assert slurm.main(argv) == 0
    out = capsys.readouterr().out
    assert "Submitted pretrain as job to debug" in out and "done" in out
    lines = [json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    saved = json.loads((job_dir / "args.json").read_text())
    assert saved["output_dir"] == str(job_dir) and saved["device"] == "cpu" and saved["resume"] == "auto"
    [record] = [json.loads(line) for line in (job_dir / slurm.RECORD).read_text().splitlines()]
    assert record["script"] == "pretrain" and record["argv"] == argv and record["cluster"] == "debug"
    assert record["executor"]["tasks_per_node"] == 1 and "gpus_per_node" not in record["executor"]

    # The same command again continues from the folder (resume auto): nothing left to train.
    assert slurm.main(argv) == 0
    assert len((job_dir / "log.txt").read_text().splitlines()) == 2
    assert len((job_dir / slurm.RECORD).read_text().splitlines()) == 2


@pytest.fixture
def in_a_slurm_job(monkeypatch):
    """What a SLURM task sees, with torch's variables restored after `export()` overwrites them."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(key, "")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")


def test_requeue_exit_is_not_turned_into_a_failure(tmp_path, monkeypatch, in_a_slurm_job):
    class Script:  # submitit's handler exits mid-torch.save, whose clean-up then raises
        @staticmethod
        def main(args):
            try:
                raise SystemExit(-1)
            except SystemExit:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(slurm, "import_script", lambda *a: Script)
    job = slurm.ScriptJob("pretrain", argparse.Namespace(output_dir=str(tmp_path / "%j")))
    with pytest.raises(SystemExit):
        job()


def test_job_exports_the_distributed_environment(tmp_path, monkeypatch, in_a_slurm_job):
    seen = {}

    class Script:
        @staticmethod
        def main(args):
            seen.update({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}, args=args)
            raise ValueError("a real error")

    monkeypatch.setattr(slurm, "import_script", lambda *a: Script)
    ns = argparse.Namespace(output_dir=str(tmp_path / "%j"), log_dir=str(tmp_path / "%j" / "tb"), world_size=1)
    with pytest.raises(ValueError, match="a real error"):  # errors stay errors
        slurm.ScriptJob("pretrain", ns)()
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["LOCAL_RANK"], seen["MASTER_PORT"]) == ("0", "1", "0", "29512")
    assert seen["args"].output_dir == str(tmp_path / "7") and seen["args"].log_dir == str(tmp_path / "7" / "tb")
    assert ns.output_dir == str(tmp_path / "%j")  # the job's own copy keeps %j for a requeue
