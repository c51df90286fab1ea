"""`--device cuda` without a usable GPU: `runtime.resolve_device` raises `DeviceError`, and every
entry point exits non-zero with one `error: ...` line, before it writes or trains anything.
Never a silent fallback to the CPU (where a 400-epoch job would quietly run)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umae_plugin.runtime import DeviceError, resolve_device

ROOT = Path(__file__).resolve().parents[1]

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend two GPUs are visible (nothing is allocated on them) and no launcher set a local rank."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)


# ---------------------------------------------------------------------------------------------
# resolve_device


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_cuda_without_gpu_raises(without_cuda, requested):
    with pytest.raises(DeviceError, match="CUDA is not available") as info:
        resolve_device(requested)
    message = str(info.value)
    assert f"--device {requested}" in message and "--device cpu" in message
    assert "\n" not in message


def test_cuda_without_gpu_does_not_warn_and_fall_back(without_cuda, recwarn):
    with pytest.raises(DeviceError):
        resolve_device("cuda")
    assert not recwarn.list  # the old behaviour: a warning, then the CPU


def test_cpu_resolves(without_cuda):
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["gpu", "cuda:x", ""])
def test_unparseable_device_raises_naming_it(requested):
    with pytest.raises(DeviceError) as info:
        resolve_device(requested)
    assert repr(requested) in str(info.value) and "\n" not in str(info.value)


def test_device_error_is_a_runtime_error():
    assert issubclass(DeviceError, RuntimeError)


def test_gpu_index_past_the_last_raises(two_gpus):
    with pytest.raises(DeviceError, match="GPU index 2 does not exist"):
        resolve_device("cuda:2")


def test_cuda_takes_the_gpu_of_the_local_rank(two_gpus, monkeypatch):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 0)  # each process: its local rank's GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_local_rank_past_the_last_gpu_raises(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match="local rank 2"):
        resolve_device("cuda")


def test_analysis_default_device_stays_automatic(without_cuda):
    """The analysis tools' default (no --device) is 'cuda when available, else cpu', not a request
    for CUDA: no error on a CPU machine."""
    from umae_plugin.analysis.features import device_from

    assert device_from(None) == torch.device("cpu")
    with pytest.raises(DeviceError):
        device_from("cuda")


def test_device_error_is_a_one_line_user_error():
    from umae_plugin.errors import UserError

    assert issubclass(DeviceError, UserError) and DeviceError.exit_code == 1


# ---------------------------------------------------------------------------------------------
# entry points, as subprocesses on this machine (which has no GPU)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_device_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error:") and "cuda" in lines[-1].lower(), proc.stderr


def assert_nothing_written(path: Path) -> None:
    assert not path.exists() or not any(path.iterdir()), sorted(p.name for p in path.iterdir())


@no_gpu
def test_quickstart_fails_up_front(tmp_path):
    out = tmp_path / "qs"
    proc = run("-m", "umae_plugin.quickstart", "--device", "cuda", "--output_dir", str(out), "--epochs", "1")
    assert_device_error(proc)
    assert_nothing_written(out)  # no pre-training ran: main_pretrain would have written checkpoints here


@no_gpu
def test_benchmark_fails(tmp_path):
    result = tmp_path / "bench.json"
    proc = run("benchmarks/bench_pretrain.py", "--device", "cuda", "--out", str(result))
    assert_device_error(proc)
    assert not result.exists()


@no_gpu
@pytest.mark.parametrize("tool, args", [
    ("collapse", ["--checkpoints", "missing.pth"]),
    ("maskratio", ["--dataset", "digits"]),
    ("tsne", ["--checkpoints", "missing.pth"]),
    ("recon", ["--checkpoint", "missing.pth"]),
])
def test_analysis_tool_fails_before_loading(tmp_path, tool, args):
    """The checkpoint paths do not exist: the device is checked before anything is loaded or written."""
    out = tmp_path / tool
    args = [str(tmp_path / a) if a.endswith(".pth") else a for a in args]
    proc = run("-m", "umae_plugin.analysis", tool, *args, "--device", "cuda", "--output_dir", str(out))
    assert_device_error(proc)
    assert_nothing_written(out)


# The three scripts: `cli.run_main` prints every `errors.UserError` (DeviceError among them) as one line.
@no_gpu
@pytest.mark.parametrize("script", ["main_pretrain.py", "main_linprobe.py", "main_finetune.py"])
def test_script_fails_and_writes_nothing(tmp_path, script):
    out = tmp_path / "out"
    proc = run(script, "--dataset", "digits", "--device", "cuda", "--num_workers", "0",
               "--output_dir", str(out), "--log_dir", str(out))
    assert_device_error(proc)
    assert_nothing_written(out)


def test_grad_scaler_is_on_for_fp16_only_and_a_pass_through_otherwise():
    from umae_plugin.runtime import Runtime

    assert Runtime(torch.device("cpu"), torch.float16, 0, 1).grad_scaler().is_enabled()
    for dtype in (None, torch.bfloat16):
        scaler = Runtime(torch.device("cpu"), dtype, 0, 1).grad_scaler()
        assert not scaler.is_enabled() and scaler.state_dict() == {}
        loss = torch.tensor(3.0)
        assert scaler.scale(loss) is loss
