"""submitit_launcher.py through a real SLURM: the one-node cluster of tests/slurm on localhost.

Skipped where Slurm is not installed or we are not root (see tests/slurm/install.sh); CI installs
it. Jobs are tiny CPU pre-trainings (a 5M-parameter ViT on 32 synthetic 32-px images); every wait
is bounded. The last test runs the same job with `--cluster local`, without SLURM.
"""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from umae_plugin import checkpoint as ckpt
from umae_plugin import slurm
from umae_plugin.data import make_synthetic_imagefolder

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "tests" / "slurm"
JOB_TIMEOUT_S = 120  # per job; they take 15-40 s


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the test cluster (or reuse a running one) and point SLURM_CONF / PATH at it."""
    # CI sets UMAE_REQUIRE_SLURM=1: there a missing cluster is a failure, not a skip.
    unavailable = pytest.fail if os.environ.get("UMAE_REQUIRE_SLURM") == "1" else pytest.skip
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        unavailable(f"Slurm is not installed ({', '.join(missing)} missing): run tests/slurm/install.sh as root")
    if os.geteuid() != 0:
        unavailable("the test cluster needs root (slurmd, munged)")
    # `eval` the script's exports in bash and read back the resulting SLURM_CONF and PATH.
    proc = subprocess.run(["bash", "-c", 'out=$("$0") || exit $?; eval "$out"; printf "%s\\0%s" "$SLURM_CONF" "$PATH"',
                           str(SLURM_DIR / "start_cluster.sh")], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"tests/slurm/start_cluster.sh failed:\n{proc.stderr}")
    was_up = "already up" in proc.stderr
    conf, path = proc.stdout.split("\0")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update(SLURM_CONF=conf, PATH=path)
    yield conf
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if not was_up:
        subprocess.run([str(SLURM_DIR / "stop_cluster.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("images"), num_classes=2, per_class=16)


def tiny_pretrain(job_dir, data, *extra, epochs=2, tasks=1):
    """A CPU pre-training of a few seconds per epoch, through the launcher's parser."""
    argv = ["pretrain", "--job_dir", str(job_dir), "--nodes", "1", "--ngpus", "0", "--tasks_per_node", str(tasks),
            "--cpus_per_task", "1", "--mem_gb", "1", "--timeout", "10",
            "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--decoder_embed_dim", "32",
            "--decoder_depth", "1", "--decoder_num_heads", "4", "--dataset", "imagefolder", "--data_path", str(data),
            "--batch_size", "8", "--epochs", str(epochs), "--warmup_epochs", "1", "--num_workers", "0",
            "--erank_samples", "8", "--print_freq", "100", "--save_freq", "100", *extra]
    name, args = slurm.parse_args(argv)
    return slurm.submit(name, args, argv=argv)


def wait_until(predicate, timeout_s, what, job=None):
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            if job is not None:
                job.cancel(check=False)
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}" + (f"\n{logs(job)}" if job else ""))
        time.sleep(0.5)


def logs(job):
    return "\n".join(f"----- task {t}\n{job.task(t).stdout() or ''}{job.task(t).stderr() or ''}"
                     for t in range(job.num_tasks))


def finish(job, timeout_s=JOB_TIMEOUT_S):
    """Wait for the job's end; its results (raises with the job's traceback if it failed)."""
    wait_until(lambda: job.done(force_check=True), timeout_s, f"job {job.job_id}", job)
    try:
        return job.results()
    except Exception as err:
        pytest.fail(f"job {job.job_id} failed: {err}\n{logs(job)}")


def logged_epochs(out):
    return [json.loads(line)["epoch"] for line in (Path(out) / "log.txt").read_text().splitlines()]


def checkpoint_epoch(out):
    return ckpt.torch_load(Path(out) / "checkpoint-last.pth")["epoch"]


two_cpus = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two 1-CPU processes need a node with 2 CPUs")


@two_cpus
def test_two_process_cpu_pretraining(slurm_cluster, images, tmp_path):
    [(job, _, ns)] = tiny_pretrain(tmp_path / "%j", images, epochs=3, tasks=2)
    out = Path(slurm.expand_job_id(ns.output_dir, job.job_id))
    assert out == tmp_path / job.job_id
    finish(job)
    assert logged_epochs(out) == [0, 1, 2] and checkpoint_epoch(out) == 2
    assert "rank 0 of world size 2" in job.task(0).stdout() and "rank 1 of world size 2" in job.task(1).stdout()
    assert "effective batch 16" in job.task(0).stdout()  # 8 per process, 2 processes
    saved = json.loads((out / "args.json").read_text())
    assert saved["world_size"] == 2 and saved["device"] == "cpu" and saved["output_dir"] == str(out)
    [record] = [json.loads(line) for line in (out / slurm.RECORD).read_text().splitlines()]
    assert record["job_id"] == job.job_id and record["executor"]["tasks_per_node"] == 2


@two_cpus
def test_interrupted_job_is_requeued_and_resumes(slurm_cluster, images, tmp_path):
    epochs = 8
    [(job, _, ns)] = tiny_pretrain(tmp_path / "%j", images, epochs=epochs, tasks=2)
    out = Path(slurm.expand_job_id(ns.output_dir, job.job_id))
    # Interrupt only once a checkpoint exists: before it, a requeue would just start over.
    wait_until(lambda: (out / "checkpoint-last.pth").exists(), JOB_TIMEOUT_S, "the first checkpoint", job)
    job._interrupt(timeout=True)  # what SLURM sends before the time limit: USR2
    finish(job)
    stdout = job.task(0).stdout()
    assert "Requeued job" in stdout, logs(job)
    resumed = [line for line in stdout.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "checkpoint-last.pth" in resumed[0], logs(job)
    interrupted_at = int(resumed[0].rsplit("epoch", 1)[1].strip(" )"))
    assert interrupted_at < epochs - 1  # it really stopped before the end
    assert logged_epochs(out) == list(range(epochs))  # each epoch exactly once
    assert checkpoint_epoch(out) == epochs - 1


def test_sweep_is_one_array_with_a_folder_per_value(slurm_cluster, images, tmp_path):
    submitted = tiny_pretrain(tmp_path / "%j", images, "--sweep", "lambda_unif=0,0.01", epochs=1)
    assert len(submitted) == 2
    array_id = submitted[0][0].job_id.split("_")[0]
    assert [job.job_id for job, _, _ in submitted] == [f"{array_id}_0", f"{array_id}_1"]
    for job, _, _ in submitted:
        finish(job)
    for (job, point, _), value in zip(submitted, (0.0, 0.01)):
        out = tmp_path / array_id / point
        assert point == f"lambda_unif={value:g}"
        assert json.loads((out / "args.json").read_text())["lambda_unif"] == value
        assert logged_epochs(out) == [0]
        assert (out / slurm.RECORD).exists()
        assert job.paths.stdout == tmp_path / array_id / f"{job.job_id}_0_log.out"  # logs beside the points
        assert f"output_dir {out}" in job.stdout()


def test_local_executor_runs_without_slurm(images, tmp_path):
    [(job, _, ns)] = tiny_pretrain(tmp_path / "%j", images, "--cluster", "local", epochs=2, tasks=2)
    out = Path(slurm.expand_job_id(ns.output_dir, job.job_id))
    finish(job)
    assert logged_epochs(out) == [0, 1] and checkpoint_epoch(out) == 1
    assert "rank 1 of world size 2" in job.task(1).stdout()
