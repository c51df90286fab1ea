"""One error path for every entry point: a checkpoint that cannot be loaded (missing, empty, text,
random bytes, truncated, another architecture, a malicious pickle), a flag that cannot work, a
diverged loss, a file that cannot be written: one line `error: ...` naming the file or flag and the
cause, exit status 2 (usage) or 1 (runtime), no traceback unless `UMAE_DEBUG=1`; a malicious
pickle is never run, whichever loader meets it."""
import argparse
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umae_plugin import checkpoint as ckpt
from umae_plugin import classify, data, distributed, errors, runtime, slurm, train_step
from umae_plugin.errors import UsageError, UserError

ROOT = Path(__file__).resolve().parents[1]

# Real registered names (the conftest's micro models exist only in this process), made tiny.
PRETRAIN = ["main_pretrain.py", "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4",
            "--embed_dim", "32", "--depth", "1", "--num_heads", "2", "--decoder_embed_dim", "16",
            "--decoder_depth", "1", "--decoder_num_heads", "2", "--epochs", "1", "--batch_size", "16",
            "--erank_freq", "0"]
# Classification takes the patch size from the --finetune checkpoint.
LINPROBE = ["main_linprobe.py", "--model", "vit_tiny_patch16", "--input_size", "32", "--epochs", "1", "--batch_size", "16"]
FINETUNE = ["main_finetune.py", "--model", "vit_tiny_patch16", "--input_size", "32", "--epochs", "1", "--batch_size", "16"]
COMMON = ["--dataset", "digits", "--device", "cpu", "--num_workers", "0"]


class Payload:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint runs when it is unpickled by
    anything but a weights-only loader. Here the call creates a marker file."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def malicious(path: Path, marker: Path, how: str = "open", legacy: bool = False) -> Path:
    payload = Payload(open, str(marker), "w") if how == "open" else Payload(os.system, f"touch '{marker}'")
    torch.save({"model": payload, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
    return path


def bad_file(folder: Path, kind: str) -> Path:
    """A file `--resume` / `--init_from` / `--finetune` cannot use."""
    path = folder / f"{kind}.pth"
    if kind == "text":
        path.write_text("epoch: 3\nthese are notes, not weights\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))  # starts with 0xcd: neither zip nor pickle
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(64)}, "epoch": 3}, folder / "whole.pth")
        whole = (folder / "whole.pth").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "truncated_legacy":
        torch.save({"model": {"w": torch.zeros(64)}}, folder / "whole_legacy.pth", _use_new_zipfile_serialization=False)
        whole = (folder / "whole_legacy.pth").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind != "missing":
        raise ValueError(kind)
    return path


CAUSE = {"missing": "No such file", "empty": "empty file", "text": "a text file", "random": "not a PyTorch checkpoint",
         "truncated": "truncated or corrupt", "truncated_legacy": "truncated or corrupt", "directory": "Is a directory",
         "malicious": "refused as unsafe"}


def run_all(*commands: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run `python <command>` for each command, all at once (each one mostly imports torch)."""
    environ = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
    environ.update(env or {})
    procs = [subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=environ, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cmd in commands]
    done = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """Exit status `code`, no traceback, and stderr ends with the one line `error: ...`, the only
    one, holding every needle."""
    shown = f"exit {proc.returncode}\nstderr:\n{proc.stderr}\nstdout (tail):\n{proc.stdout[-2000:]}"
    assert proc.returncode == code, shown
    assert "Traceback" not in proc.stderr, shown
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], shown
    for needle in needles:
        assert needle in error_lines[0], shown
    return error_lines[0]


# ---------------------------------------------------------------------------------------------
# the scripts, as a user runs them


ENTRIES = {
    "pretrain --resume": (PRETRAIN, "--resume"),
    "pretrain --init_from": (PRETRAIN, "--init_from"),
    "linprobe --finetune": (LINPROBE, "--finetune"),
    "finetune --finetune": (FINETUNE, "--finetune"),
}


@pytest.mark.parametrize("entry", ENTRIES)
def test_unusable_checkpoint_is_one_line_naming_the_file(tmp_path, entry):
    """Text, empty, random bytes, a malicious pickle: exit 1 and one line naming the file and the
    cause (not `KeyError: 101`, `EOFError` or torch's page of advice); the pickle never runs."""
    script, flag = ENTRIES[entry]
    marker = tmp_path / "marker"
    files = {kind: bad_file(tmp_path, kind) for kind in ("text", "empty", "random")}
    files["malicious"] = malicious(tmp_path / "malicious.pth", marker)
    procs = run_all(*([*script, *COMMON, "--output_dir", tmp_path / f"out_{kind}", "--log_dir", tmp_path / f"out_{kind}",
                       flag, path] for kind, path in files.items()))
    for (kind, path), proc in zip(files.items(), procs):
        line = assert_one_line_error(proc, str(path), CAUSE[kind])
        if script is not PRETRAIN:
            assert line.startswith(f"error: {flag} {path}"), line  # classification names the flag too
    assert not marker.exists(), "the malicious checkpoint was unpickled"


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    """--finetune with a 32-d encoder for a 192-d model: one line saying what does not fit."""
    from umae_plugin.registry import create_model

    other = create_model("vit_tiny_patch16", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    [proc] = run_all([*FINETUNE, *COMMON, "--output_dir", tmp_path / "out", "--log_dir", tmp_path / "out",
                      "--finetune", path])
    assert_one_line_error(proc, "does not fit the model's architecture", "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 192)")


def test_usage_errors_exit_2_and_runtime_errors_exit_1(tmp_path):
    """A bad flag exits with 2, whether argparse (`--mask_ratio 1.5`) or the run (an --input_size
    that is no multiple of the --finetune checkpoint's patch size) finds it; a file that cannot be
    read exits with 1."""
    source = tmp_path / "source.pth"
    from umae_plugin.registry import create_model

    # A whole encoder: the run reads the patch size off the checkpoint's model (`checkpoint_model_args`).
    torch.save({"model": create_model("mae_vit_micro").state_dict()}, source)
    out = ["--output_dir", tmp_path / "out", "--log_dir", tmp_path / "out"]
    argparse_usage, run_usage, runtime_error = run_all(
        [*PRETRAIN, *COMMON, *out, "--mask_ratio", "1.5"],
        [*FINETUNE, *COMMON, *out, "--finetune", source, "--input_size", "30"],  # the checkpoint's patch: 4
        [*FINETUNE, *COMMON, *out, "--finetune", bad_file(tmp_path, "empty")],
    )
    assert argparse_usage.returncode == 2 and "--mask_ratio must be in [0, 1)" in argparse_usage.stderr
    assert "Traceback" not in argparse_usage.stderr
    assert_one_line_error(run_usage, "--input_size 30 is not a multiple of the patch size 4", code=2)
    assert_one_line_error(runtime_error, "empty file", code=1)


def test_umae_debug_shows_the_traceback(tmp_path):
    path = bad_file(tmp_path, "text")
    [proc] = run_all([*PRETRAIN, *COMMON, "--output_dir", tmp_path / "out", "--log_dir", tmp_path / "out",
                      "--init_from", path], env={errors.DEBUG_ENV: "1"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --init_from {path}: a text file, not a PyTorch checkpoint"


def test_analysis_tool_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    path = malicious(tmp_path / "malicious.pth", marker)
    [proc] = run_all(["-m", "umae_plugin.analysis", "collapse", "--checkpoints", path, "--dataset", "digits",
                      "--device", "cpu", "--output_dir", tmp_path / "out"])
    assert_one_line_error(proc, str(path), "refused as unsafe")
    assert not marker.exists()


def test_launcher_os_error_is_one_line(tmp_path):
    """An OSError (here: the job folder lies under a file) is one line `<filename>: <strerror>`."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    [proc] = run_all(["submitit_launcher.py", "pretrain", "--cluster", "local", "--nodes", "1", "--ngpus", "0",
                      "--job_dir", blocker / "job", *COMMON])
    assert_one_line_error(proc, str(blocker / "job"), "Not a directory")


# ---------------------------------------------------------------------------------------------
# checkpoint.torch_load and the loaders built on it, in process


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "random", "truncated", "truncated_legacy", "directory"])
@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_names_the_path_and_the_cause(tmp_path, kind, mmap):
    path = bad_file(tmp_path, kind)
    with pytest.raises(UserError) as info:
        ckpt.torch_load(path, mmap=mmap)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and CAUSE[kind] in message and "\n" not in message, message


def test_torch_load_happy_path_is_unchanged(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 2, "args": argparse.Namespace(model="mae_vit_base_patch16")}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        for mmap in (False, True):  # a legacy file cannot be mapped: it is read whole
            got = ckpt.torch_load(tmp_path / name, mmap=mmap)
            assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["epoch"] == 2
            assert got["args"] == state["args"]


@pytest.mark.parametrize("how, legacy", [("open", False), ("os.system", False), ("open", True)])
@pytest.mark.parametrize("loader", ["torch_load", "load_pretrained", "read_checkpoint", "find_latest_checkpoint"])
def test_malicious_pickle_never_runs(tmp_path, caplog, how, legacy, loader):
    marker = tmp_path / "marker"
    path = malicious(tmp_path / "checkpoint-3.pth", marker, how, legacy)
    if loader == "find_latest_checkpoint":  # skips files it cannot load, with one line saying why
        with caplog.at_level(logging.WARNING, logger="umae.checkpoint"):
            assert ckpt.find_latest_checkpoint(tmp_path) is None
        [record] = [r for r in caplog.records if str(path) in r.getMessage()]
        assert "refused as unsafe" in record.getMessage() and "\n" not in record.getMessage()
    else:
        load = {"torch_load": ckpt.torch_load,
                "load_pretrained": lambda p: ckpt.load_pretrained(torch.nn.Linear(2, 2), p),
                "read_checkpoint": lambda p: ckpt.read_checkpoint(p, "--finetune", mmap=True)}[loader]
        with pytest.raises(UserError) as info:
            load(path)
        message = str(info.value)
        assert str(path) in message and "refused as unsafe" in message and "\n" not in message, message
        assert errors.exit_code(info.value) == 1
    assert not marker.exists(), "the malicious checkpoint was unpickled"


# ---------------------------------------------------------------------------------------------
# the handler every entry point runs in


def exit_of(fn, *args):
    with pytest.raises(SystemExit) as info:
        errors.exit_on_error(fn, *args)
    return info.value.code


def raiser(err):
    def fn():
        raise err
    return fn


def test_non_finite_loss_is_one_line_exit_1(capsys):
    def diverge():
        train_step.check_finite(torch.tensor(True), "at epoch 3, step 17")

    assert exit_of(diverge) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: non-finite loss at epoch 3, step 17: stopping.")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.mark.parametrize("err, code, line", [
    (UsageError("--batch_size must be >= 1, got 0"), 2, "error: --batch_size must be >= 1, got 0"),
    (classify.ConfigError("--model nope: no classifier named 'nope'"), 2, "error: --model nope: no classifier named 'nope'"),
    (data.DataError("image folder /x/train does not exist"), 1, "error: image folder /x/train does not exist"),
    (runtime.DeviceError("--device cuda: no GPU visible"), 1, "error: --device cuda: no GPU visible"),
    (distributed.LaunchError("RANK is set but WORLD_SIZE is not"), 1, "error: RANK is set but WORLD_SIZE is not"),
    (slurm.LauncherError("no job folder"), 1, "error: no job folder"),
    (PermissionError(13, "Permission denied", "/out/log.txt"), 1, "error: /out/log.txt: Permission denied"),
    (OSError(28, "No space left on device"), 1, "error: No space left on device"),
    (ckpt.CheckpointMismatchError("checkpoint does not fit the model's architecture:\n  shape mismatch  cls_token: "
                                  "checkpoint (1, 1, 32) vs model (1, 1, 64)\n" + "  missing key     blocks.1.x\n" * 6),
     1, "error: checkpoint does not fit the model's architecture: shape mismatch cls_token: checkpoint (1, 1, 32) vs "
        "model (1, 1, 64); missing key blocks.1.x; missing key blocks.1.x; missing key blocks.1.x; ... 3 more "
        "(UMAE_DEBUG=1 shows all)"),
])
def test_user_errors_are_one_line_with_their_exit_status(capsys, monkeypatch, err, code, line):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    assert exit_of(raiser(err)) == code
    assert capsys.readouterr().err == line + "\n"


def test_debug_prints_the_traceback_first(capsys, monkeypatch):
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert exit_of(raiser(UserError("--resume x.pth: empty file"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("\nerror: --resume x.pth: empty file\n")


def test_interrupt_exits_130_quietly(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    assert exit_of(raiser(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == ""


def test_bugs_keep_their_traceback_and_exits_pass_through(capsys):
    with pytest.raises(ZeroDivisionError):  # not a user error: the interpreter prints its traceback
        errors.exit_on_error(lambda: 1 / 0)
    with pytest.raises(KeyError):
        errors.exit_on_error(raiser(KeyError(101)))
    with pytest.raises(SystemExit) as info:  # argparse's usage errors keep their status
        errors.exit_on_error(raiser(SystemExit(2)))
    assert info.value.code == 2 and capsys.readouterr().err == ""
    assert errors.exit_on_error(lambda a, b=0: a + b, 1, b=2) == 3


def test_error_classes_are_user_errors_and_keep_their_builtin_bases():
    assert issubclass(classify.ConfigError, UsageError) and issubclass(classify.ConfigError, ValueError)
    for cls, builtin in [(data.DataError, ValueError), (ckpt.CheckpointMismatchError, ValueError),
                         (runtime.DeviceError, RuntimeError), (distributed.LaunchError, RuntimeError),
                         (train_step.NonFiniteLossError, FloatingPointError), (slurm.LauncherError, RuntimeError)]:
        assert issubclass(cls, UserError) and issubclass(cls, builtin) and not issubclass(cls, UsageError), cls
        assert errors.exit_code(cls("x")) == 1
    assert errors.exit_code(classify.ConfigError("x")) == 2
