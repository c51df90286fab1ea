"""Behaviour goldens for the architecture redesign: each scenario runs the real command lines on tiny
models and data (CPU, one thread), and keeps every checkpoint tensor and every deterministic
logged value, so a refactor can be checked to change nothing.

    python tests/goldens/scenarios.py make [NAME ...]     # (re)write tests/goldens/<name>.safetensors / .json
    python tests/goldens/scenarios.py check [NAME ...]    # compare with them; exit 1 on a difference

Scenarios: pre-training U-MAE with the online probes, ranks and k-NN monitor (`pretrain_umae`); the
same run stopped after its first epoch and resumed (`pretrain_resume`); SimMIM (`simmim`); the cached
linear probe with lr search (`linprobe_cached`) and the image-level probe (`linprobe_image`) of the
first scenario's checkpoint; fine-tuning it with mixup, cutmix, layer decay and drop path
(`finetune`); one epoch of two gloo processes under torchrun (`pretrain_ddp`).

`pretrain_resume` resumes from `pretrain_umae_checkpoint-0.pth`, a checkpoint written by the code
that made the goldens. Kept: every tensor of every `checkpoint-last.pth` (model, optimizer state, online probes, probe
heads, norms, scaler, RNG states), and every number of every `log.txt` line except timings, speeds,
memory and paths. `check` is bitwise where the recorded `torch.backends.cpu.get_cpu_capability()`
and torch version match this machine's, else within 1e-6 (absolute, plus 1e-5 relative).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")

TINY = ["--input_size", "32", "--patch_size", "4", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
        "--decoder_embed_dim", "16", "--decoder_depth", "1", "--decoder_num_heads", "2"]
COMMON = ["--dataset", "digits", "--device", "cpu", "--num_workers", "0", "--print_freq", "5", "--seed", "3"]
PRETRAIN = ["--model", "umae_vit_tiny_patch16", *TINY, "--norm_pix_loss", "--lambda_unif", "0.01", "--unif_pool",
            "cls", "--batch_size", "128", "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-3",
            "--online_probe", "--erank_freq", "1", "--erank_samples", "64", "--knn_freq", "1", "--knn_bank", "300",
            "--save_freq", "1", *COMMON]
SKIPPED = ("images_per_s", "data_wait", "max_mem", "time", "n_parameters")  # speeds, waits, memory, timings, sizes


def kept(key: str) -> bool:
    """A log key whose value is behaviour (not a timing, speed, memory figure or seconds count)."""
    return not any(s in key for s in SKIPPED) and not key.endswith("_s")


def py(script: str, *argv: str | Path) -> list[str]:
    return [sys.executable, str(ROOT / script), *(str(a) for a in argv)]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[1:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrained(work: Path) -> Path:
    """The first scenario's run (made once per `work` folder); its checkpoint feeds the probes."""
    out = work / "pretrain_umae"
    if not (out / "checkpoint-last.pth").is_file():
        run(py("main_pretrain.py", *PRETRAIN, "--output_dir", out, "--log_dir", out))
    return out


def scenario(name: str, work: Path) -> list[Path]:
    """Run scenario `name` under `work`; the run folders whose checkpoint and log it keeps."""
    if name == "pretrain_umae":
        return [pretrained(work)]
    if name == "pretrain_resume":
        # resumed from a checkpoint written by the code that made the goldens (kept as a file), so an
        # old checkpoint's optimizer moments must land on the same parameters after a redesign
        stored = HERE / "pretrain_umae_checkpoint-0.pth"
        if MAKING[0] or not stored.is_file():
            shutil.copy(pretrained(work) / "checkpoint-0.pth", stored)
        out = work / name
        out.mkdir()
        shutil.copy(stored, out / "checkpoint-last.pth")  # a run stopped after epoch 0
        run(py("main_pretrain.py", *PRETRAIN, "--output_dir", out, "--log_dir", out, "--resume", "auto"))
        return [out]
    if name == "simmim":
        out = work / name
        run(py("main_pretrain.py", "--model", "simmim_vit_tiny_patch16", *TINY[:10], "--batch_size", "128",
               "--epochs", "1", "--warmup_epochs", "1", "--erank_freq", "1", "--erank_samples", "64", *COMMON,
               "--output_dir", out, "--log_dir", out))
        return [out]
    if name in ("linprobe_cached", "linprobe_image"):
        out = work / name
        extra = ["--cache_features", "--lr_search", "--lr_factors", "0.3,1,3", "--epochs", "3"] \
            if name == "linprobe_cached" else ["--epochs", "1", "--batch_size", "64"]
        run(py("main_linprobe.py", "--model", "vit_tiny_patch16", "--finetune", pretrained(work) / "checkpoint-last.pth",
               "--nb_classes", "10", "--warmup_epochs", "1", "--lr", "1.0", "--cls_token", *COMMON, *extra,
               "--output_dir", out, "--log_dir", out))
        return [out]
    if name == "finetune":
        out = work / name
        run(py("main_finetune.py", "--model", "vit_tiny_patch16", "--finetune", pretrained(work) / "checkpoint-last.pth",
               "--nb_classes", "10", "--input_size", "32", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "64",
               "--blr", "1e-3",
               "--mixup", "0.8", "--cutmix", "1.0", "--layer_decay", "0.75", "--drop_path", "0.1", "--global_pool",
               *COMMON, "--output_dir", out, "--log_dir", out))
        return [out]
    if name == "pretrain_ddp":
        out = work / name
        flags = list(PRETRAIN)
        flags[flags.index("--epochs") + 1] = "1"
        flags[flags.index("--batch_size") + 1] = "64"
        run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), str(ROOT / "main_pretrain.py"), *flags, "--output_dir", str(out), "--log_dir", str(out)])
        return [out]
    raise SystemExit(f"error: unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


MAKING = [False]  # `make`: the stored epoch-0 checkpoint is rewritten too

SCENARIOS = ("pretrain_umae", "pretrain_resume", "simmim", "linprobe_cached", "linprobe_image", "finetune",
             "pretrain_ddp")


def tensors_of(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Every tensor in a checkpoint's nested dicts / lists, keyed by its path; `args` is skipped."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "args":
                tensors_of(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            tensors_of(v, f"{prefix}/{i}", out)


def values_of(folder: Path) -> list[dict]:
    """The deterministic numbers of every log line (timings, speeds, memory, counts of parameters left out)."""
    lines = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in line.items() if isinstance(v, (int, float)) and kept(k)} for line in lines]


def capture(name: str, work: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    values: dict = {"meta": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                             "threads": 1}}
    for folder in scenario(name, work):
        tensors_of(torch.load(folder / "checkpoint-last.pth", map_location="cpu", weights_only=True), folder.name,
                   tensors)
        values[folder.name] = values_of(folder)
    return tensors, values


def compare(name: str, tensors: dict, values: dict) -> list[str]:
    """The differences from the stored goldens of `name`, as lines (empty: none)."""
    gold_t = load_file(HERE / f"{name}.safetensors")
    gold_v = json.loads((HERE / f"{name}.json").read_text())
    exact = gold_v["meta"]["cpu_capability"] == values["meta"]["cpu_capability"] and \
        gold_v["meta"]["torch"] == values["meta"]["torch"]
    problems = []
    if set(gold_t) != set(tensors):
        problems.append(f"{name}: tensors missing {sorted(set(gold_t) - set(tensors))[:5]}, "
                        f"new {sorted(set(tensors) - set(gold_t))[:5]}")
    for k in sorted(set(gold_t) & set(tensors)):
        a, b = gold_t[k], tensors[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {k}: {a.dtype}{tuple(a.shape)} -> {b.dtype}{tuple(b.shape)}")
        elif exact and not torch.equal(a, b):
            problems.append(f"{name}: {k}: not bitwise equal (max |diff| {(a.double() - b.double()).abs().max():.3g})")
        elif not exact and a.is_floating_point() and not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6):
            problems.append(f"{name}: {k}: differs beyond 1e-6 (max |diff| {(a.double() - b.double()).abs().max():.3g})")
    for folder in (k for k in gold_v if k != "meta"):
        old, new = gold_v[folder], values.get(folder, [])
        if len(old) != len(new):
            problems.append(f"{name}: {folder}/log.txt: {len(old)} lines -> {len(new)}")
            continue
        for i, (lo, ln) in enumerate(zip(old, new)):
            if set(lo) != set(ln):
                problems.append(f"{name}: {folder}/log.txt line {i}: keys {sorted(set(lo) ^ set(ln))}")
            for k in set(lo) & set(ln):
                same = lo[k] == ln[k] if exact else abs(lo[k] - ln[k]) <= 1e-6 + 1e-5 * abs(lo[k])
                if not same:
                    problems.append(f"{name}: {folder}/log.txt line {i}: {k} {lo[k]!r} -> {ln[k]!r}")
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("make", "check"):
        print(__doc__)
        return 2
    names = argv[1:] or list(SCENARIOS)
    MAKING[0] = argv[0] == "make"
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            tensors, values = capture(name, work)
            if argv[0] == "make":
                save_file({k: v.contiguous() for k, v in tensors.items()}, HERE / f"{name}.safetensors")
                (HERE / f"{name}.json").write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
                print(f"wrote {name}: {len(tensors)} tensors, {sum(len(v) for k, v in values.items() if k != 'meta')} "
                      "log lines", flush=True)
            else:
                found = compare(name, tensors, values)
                problems += found
                print(f"{name}: {'ok' if not found else f'{len(found)} difference(s)'}", flush=True)
    for line in problems[:50]:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
