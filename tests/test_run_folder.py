"""The output folder's lock and housekeeping (`umae_plugin.run_folder`), alone and in the scripts."""
import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import main_finetune
import main_pretrain
from umae_plugin import checkpoint as ckpt
from umae_plugin import run_folder
from umae_plugin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def micro_args(out, *extra):
    """The tiny digits pre-training run of test_main_pretrain.py."""
    argv = ["--model", "umae_vit_micro", "--dataset", "digits", "--input_size", "32", "--epochs", "1",
            "--warmup_epochs", "1", "--batch_size", "128", "--device", "cpu", "--num_workers", "0",
            "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "5", "--erank_samples", "20"]
    return main_pretrain.get_args_parser().parse_args(argv + list(extra))


def test_second_lock_in_the_same_process_is_refused_with_the_holder_named(tmp_path):
    env = {"SLURM_JOB_ID": "777", "SLURM_ARRAY_JOB_ID": "770", "SLURM_ARRAY_TASK_ID": "7"}
    with run_folder.claim(tmp_path, env=env):
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["slurm_job"] == "777 (array 770_7)" and record["start"]
        with pytest.raises(UserError) as info:
            with run_folder.claim(tmp_path, env={}):
                pass
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, run_folder.FolderBusyError)
    for part in (str(tmp_path), f"pid {os.getpid()}", "SLURM job 777 (array 770_7)", record["host"], record["start"],
                 f"delete {tmp_path / '.lock'}"):
        assert part in message, part
    with run_folder.claim(tmp_path):  # released at the end of the `with`
        pass


def test_lock_held_by_another_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from umae_plugin import run_folder
            with run_folder.claim({str(tmp_path)!r}):
                print("held", flush=True)
                sys.stdin.readline()
        """)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_folder.FolderBusyError, match=f"pid {holder.pid},"):
            run_folder.claim(tmp_path).acquire()
    finally:
        holder.communicate("\n", timeout=60)
    with run_folder.claim(tmp_path):  # the holder exited: free again
        pass


def test_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with run_folder.claim(tmp_path):
            raise RuntimeError("boom")
    with run_folder.claim(tmp_path):
        pass


def test_disabled_or_no_output_dir_takes_no_lock(tmp_path):
    with run_folder.claim(tmp_path, enabled=False), run_folder.claim(""), run_folder.claim(None):
        with run_folder.claim(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists() or (tmp_path / ".lock").read_text() == ""


def test_requeued_slurm_job_waits_for_its_previous_holder(tmp_path):
    env = {"SLURM_JOB_ID": "4242"}
    previous = run_folder.claim(tmp_path, env=env)
    previous.acquire()
    sleeps = []

    def sleep(seconds):  # the previous holder's lock goes while the requeued job polls
        sleeps.append(seconds)
        if len(sleeps) == 3:
            previous.release()

    with run_folder.claim(tmp_path, env=env, wait_s=60, poll_s=0.25, sleep=sleep) as requeued:
        assert requeued.locked
    assert sleeps == [0.25, 0.25, 0.25]


def test_requeued_slurm_job_gives_up_after_the_wait(tmp_path):
    env = {"SLURM_JOB_ID": "4242"}
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with run_folder.claim(tmp_path, env=env):
        with pytest.raises(run_folder.FolderBusyError, match="waited 10 s"):
            run_folder.claim(tmp_path, env=env, wait_s=10, poll_s=1, sleep=sleep, clock=lambda: now[0]).acquire()
        assert now[0] == pytest.approx(10)
        # another job does not wait
        now[0] = 0.0
        with pytest.raises(run_folder.FolderBusyError):
            run_folder.claim(tmp_path, env={"SLURM_JOB_ID": "1"}, wait_s=10, poll_s=1, sleep=sleep,
                             clock=lambda: now[0]).acquire()
        assert now[0] == 0.0


def test_unlockable_filesystem_warns_once_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(run_folder, "_warned_unlockable", set())
    with caplog.at_level(logging.WARNING, logger="umae"):
        for _ in range(2):
            with run_folder.claim(tmp_path) as claimed:
                assert not claimed.locked
    warnings = [r for r in caplog.records if "cannot lock" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].getMessage()


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(UserError, match=f"--output_dir {path}: exists and is not a folder"):
        run_folder.claim(path).acquire()
    with pytest.raises(UserError, match="cannot create the folder"):
        run_folder.claim(path / "sub").acquire()


def test_output_dir_that_cannot_be_written(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match=f"--output_dir {tmp_path}: cannot write there \\(Read-only file system\\)"):
        run_folder.claim(tmp_path).acquire()


def test_stale_temp_files_removed_under_the_lock(tmp_path):
    stale = [".checkpoint-last.pth.k2j_9xqa.tmp", ".checkpoint-12.pth.abcdefgh.tmp", ".args.json.tmp12345"]
    kept = ["checkpoint-last.pth", "log.txt", ".other.tmp", "notes.checkpoint-1.pth.x.tmp", ".args.json"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    with run_folder.claim(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [".lock"])


def test_the_real_save_atomic_temp_name_matches(tmp_path, monkeypatch):
    """The pattern follows `save_atomic`'s mkstemp name: a write killed mid-way is cleaned."""
    import torch

    names = []

    def killed(obj, f):
        names.extend(p.name for p in tmp_path.iterdir())
        raise SystemExit(1)

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(SystemExit):
        ckpt.save_atomic({"epoch": 1}, tmp_path / "checkpoint-3.pth")
    assert len(names) == 1 and run_folder.STALE_TEMP_RE.match(names[0]), names


# ---------------------------------------------------------------------------------------------
# in the scripts


def test_two_pretrain_runs_in_one_process_into_one_folder(tmp_path):
    main_pretrain.main(micro_args(tmp_path))
    main_pretrain.main(micro_args(tmp_path, "--seed", "1"))  # the first run released the lock
    assert json.loads((tmp_path / "args.json").read_text())["seed"] == 1
    assert json.loads((tmp_path / "args.1.json").read_text())["seed"] == 0
    assert (tmp_path / ".lock").read_text() == ""  # taken by each run, released: no holder left


def test_pretrain_refused_while_another_run_holds_the_folder(tmp_path):
    out = tmp_path / "out"
    with run_folder.claim(out):
        with pytest.raises(run_folder.FolderBusyError, match=f"--output_dir {out} is in use by another run"):
            main_pretrain.main(micro_args(out))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no args.json, log.txt, checkpoint


def test_pretrain_output_dir_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        main_pretrain.main(micro_args(out))


def test_pretrain_resume_rewrites_a_lost_numbered_checkpoint(tmp_path):
    main_pretrain.main(micro_args(tmp_path, "--epochs", "3", "--save_freq", "2"))
    saved = ckpt.torch_load(tmp_path / "checkpoint-0.pth")
    shutil.copy(tmp_path / "checkpoint-0.pth", tmp_path / "checkpoint-last.pth")  # killed after epoch 0...
    for name in ("checkpoint-0.pth", "checkpoint-2.pth"):  # ...while writing checkpoint-0.pth
        (tmp_path / name).unlink()
    main_pretrain.main(micro_args(tmp_path, "--epochs", "3", "--save_freq", "2", "--resume", "auto"))
    restored = ckpt.torch_load(tmp_path / "checkpoint-0.pth")
    assert restored["epoch"] == 0
    for k, v in saved["model"].items():
        assert (restored["model"][k] == v).all(), k
    assert (tmp_path / "checkpoint-2.pth").exists() and not (tmp_path / "checkpoint-1.pth").exists()


def test_finetune_lock_and_lost_numbered_checkpoint(tmp_path, folder):
    out = tmp_path / "ft"
    argv = ["--model", "vit_micro", "--dataset", "imagefolder", "--data_path", str(folder), "--input_size", "32",
            "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "8", "--nb_classes", "3", "--device", "cpu",
            "--num_workers", "0", "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "2"]

    def args(*extra):
        return main_finetune.get_args_parser().parse_args(argv + list(extra))

    with run_folder.claim(out):
        with pytest.raises(run_folder.FolderBusyError):
            main_finetune.main(args())
    assert not (out / "args.json").exists()

    main_finetune.main(args("--epochs", "1"))
    (out / "checkpoint-0.pth").unlink()  # a kill while writing it, after checkpoint-last.pth
    main_finetune.main(args("--resume", "auto"))
    assert ckpt.torch_load(out / "checkpoint-0.pth")["epoch"] == 0
    assert ckpt.torch_load(out / "checkpoint-1.pth")["epoch"] == 1
