"""The GPU check (run through benchmarks/gpu_check.sh): model throughput and MFU of MAE vs U-MAE
ViT-B/16, the data path of each `--data_backend`, and 200 steps of `main_pretrain.py` per backend,
in under ~5 minutes of one H100 / H200. Needs only torch, torchvision, timm and numpy: it runs from
the checkout (no install, no scikit-learn: its JPEGs are synthetic, `bench_data.make_jpeg_folder`
with `source="synthetic"`: smooth colour noise + gradients + grain, 300-500 px sides, quality 90).

    bash benchmarks/gpu_check.sh                      # the GPU: JSON to benchmarks/results/gpu_check_<gpu>.json
    SMOKE=1 bash benchmarks/gpu_check.sh --out_dir /tmp/x    # CPU smoke mode (tests): tiny model, seconds

Parts, all in one process except the `main_pretrain.py` runs:
1. `matmul`: a bf16 8192^3 matmul's measured TFLOP/s (the attainable dense peak).
2. `attention`: which `scaled_dot_product_attention` kernel a bf16 ViT-B training step runs (aten op
   names and CUDA kernel names from the profiler: flash / efficient / cudnn / math).
3. `model`: MAE and U-MAE (lambda 0.01, mean pool) ViT-B/16, 224 px, 512-d 8-block decoder, norm-pix,
   batch 256, bf16 autocast, fused AdamW; eager, then each transformer block `torch.compile`d
   (regional: a fraction of whole-model compile time); timed blocks alternate between the two
   models; images/s, U-MAE / MAE step-time ratio, FLOPs per step (`FlopCounterMode`, forward +
   backward), MFU against the vendor's dense bf16 peak (by `torch.cuda.get_device_name()`) and
   against the measured matmul rate.
4. `data_path`: images/s of each backend's training loader alone (uint8 to the device and
   `normalize_pixels`), `pil` / `tensor` with a worker per CPU core, `gpu` likewise (its workers
   only read bytes), over the generated JPEGs.
5. `main_pretrain`: `main_pretrain.py` (the smoke mode: the `gpu` backend only) for 200 steps (one epoch of 200 x 128 JPEGs: unique images
   hard-linked under several names), eager MAE ViT-B, each backend: `train_images_per_s`,
   `train_data_wait_frac` from log.txt, and the data-wait share of the progress windows after the
   first (worker start excluded).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # a bare checkout: the package and bench_data from there
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_data  # noqa: E402
from umae_plugin import data  # noqa: E402
from umae_plugin.optim import param_groups_weight_decay  # noqa: E402
from umae_plugin.registry import create_model  # noqa: E402
from umae_plugin.runtime import adamw_options  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by device-name fragment (SXM parts).
VENDOR_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

FULL = dict(model_kw=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                          decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True),
            batch=256, steps=10, blocks=3, warmup=3, matmul=8192, unique_jpegs=1024, loader_images=4096,
            pretrain_steps=200, pretrain_batch=128, pretrain_model=["--model", "mae_vit_base_patch16"],
            input_size=224)
SMOKE = dict(model_kw=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                           decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True),
             batch=8, steps=2, blocks=2, warmup=1, matmul=256, unique_jpegs=12, loader_images=24,
             pretrain_steps=3, pretrain_batch=4,
             pretrain_model=["--model", "mae_vit_tiny_patch16", "--embed_dim", "32", "--depth", "1", "--num_heads",
                             "2", "--decoder_embed_dim", "16", "--decoder_depth", "1", "--decoder_num_heads", "2",
                             "--patch_size", "8"],
             input_size=32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


# ---------------------------------------------------------------------------------------------
# 1. matmul


def measure_matmul(device: torch.device, n: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / seconds / 1e12}


# ---------------------------------------------------------------------------------------------
# 2-3. model throughput


def build(kw: dict, lambda_unif: float, device: torch.device, compiled: bool):
    torch.manual_seed(0)
    if lambda_unif > 0:
        model = create_model("umae_vit_base_patch16", lambda_unif=lambda_unif, unif_pool="mean", **kw)
    else:
        model = create_model("mae_vit_base_patch16", **kw)
    model.to(device)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95), **adamw_options(device))
    if compiled:  # regional: every transformer block, not the whole model
        for block in (*model.blocks, *model.decoder_blocks):
            block.compile()
    return model, opt


def make_step(model, opt, imgs, autocast):
    def step():
        with autocast():
            loss = model(imgs, 0.75)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def attention_kernels(step, device: torch.device) -> dict:
    """The SDPA aten ops and attention-looking CUDA kernels one step runs (profiler names)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    names = {e.key for e in prof.key_averages()}
    ops = sorted(n for n in names if n.startswith("aten::_scaled_dot_product") or n.startswith("aten::_flash")
                 or n.startswith("aten::_efficient") or n.startswith("aten::_cudnn_attention"))
    kernels = sorted(n[:120] for n in names if re.search(r"flash|fmha|sdpa|attention", n, re.I)
                     and not n.startswith("aten::"))
    kind = ("flash" if any("flash" in n for n in ops + kernels) else
            "cudnn" if any("cudnn" in n for n in ops + kernels) else
            "efficient" if any("efficient" in n or "fmha" in n for n in ops + kernels) else "math")
    return {"kind": kind, "aten_ops": ops, "kernels": kernels[:8]}


def model_throughput(cfg: dict, device: torch.device, compiled: bool, autocast, flops: int | None = None) -> dict:
    """Eager or per-block compiled MAE / U-MAE steps, alternating; `flops` (per step) is counted on
    the eager model (`FlopCounterMode` is a dispatch mode: kept away from compiled code)."""
    kw, batch = cfg["model_kw"], cfg["batch"]
    imgs = torch.randn(batch, 3, kw["img_size"], kw["img_size"], device=device)
    runs = {}
    start = time.perf_counter()
    for name, lam in (("mae", 0.0), ("umae", 0.01)):
        model, opt = build(kw, lam, device, compiled)
        step = make_step(model, opt, imgs, autocast)
        for _ in range(cfg["warmup"]):
            step()
        sync(device)
        runs[name] = {"step": step, "model": model, "times": []}
    warm_s = time.perf_counter() - start
    for _ in range(cfg["blocks"]):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(cfg["steps"]):
                run["step"]()
            sync(device)
            run["times"].append((time.perf_counter() - t0) / cfg["steps"])
    if flops is None:
        with FlopCounterMode(display=False) as counter:  # forward and backward of one MAE step
            with autocast():
                loss = runs["mae"]["model"](imgs, 0.75)[0]
            loss.backward()
        flops = counter.get_total_flops()
    out = {"compiled": compiled, "batch": batch, "warmup_and_compile_s": round(warm_s, 1),
           "flops_per_step": flops, "gflop_per_image": flops / batch / 1e9}
    for name, run in runs.items():
        sec = min(run["times"])
        out[name] = {"s_per_step": sec, "images_per_s": batch / sec, "block_s_per_step": run["times"]}
    out["umae_over_mae_time"] = out["umae"]["s_per_step"] / out["mae"]["s_per_step"]
    out["attention"] = attention_kernels(runs["mae"]["step"], device)
    return out


# ---------------------------------------------------------------------------------------------
# 4. data path


def loader_rate(root: Path, backend: str, size: int, batch: int, workers: int, device: torch.device) -> dict:
    ds = data.build_pretrain_dataset("imagefolder", root, size, backend)
    loader = data.build_pretrain_loader(ds, batch, backend=backend, device=device, input_size=size,
                                        num_workers=workers, pin_memory=device.type == "cuda")
    rates = []
    for epoch in range(3):  # the first pass starts the workers: not timed
        data.set_epoch(loader, epoch)
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for imgs, _ in loader:
            x = data.normalize_pixels(imgs.to(device, non_blocking=True))
            n += len(x)
        sync(device)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    return {"workers": workers, "images_per_s": max(rates)}


# ---------------------------------------------------------------------------------------------
# 5. main_pretrain.py


def linked_folder(unique: Path, root: Path, total: int) -> Path:
    """`total` names in `root/train/<class>/` hard-linked (or copied) round-robin to the unique
    JPEGs of `unique/train`: one epoch of `total` images without writing them all."""
    files = sorted((unique / "train").glob("*/*.jpg"))
    for n in range(total):
        src = files[n % len(files)]
        dst = root / "train" / src.parent.name / f"{n:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
    return root


def pretrain_runs(cfg: dict, root: Path, device: torch.device, workers: int, backends=data.FILE_BACKENDS) -> dict:
    out = {}
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "main_pretrain.py"), *cfg["pretrain_model"], "--input_size",
                   str(cfg["input_size"]), "--dataset", "imagefolder", "--data_path", str(root), "--batch_size",
                   str(cfg["pretrain_batch"]), "--epochs", "1", "--warmup_epochs", "1", "--device", device.type,
                   "--num_workers", str(workers), "--erank_freq", "0", "--print_freq", "20", "--output_dir", tmp,
                   "--log_dir", tmp, "--data_backend", backend, "--norm_pix_loss"]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if run.returncode != 0:
                out[backend] = {"error": (run.stdout[-1500:] + run.stderr[-2500:])}
                log(f"main_pretrain.py --data_backend {backend} failed:\n{run.stderr[-2500:]}")
                continue
            line = json.loads((Path(tmp) / "log.txt").read_text().splitlines()[-1])
        windows = [float(m) for m in re.findall(r"img/s, data ([0-9.]+)%", run.stdout)]
        out[backend] = {"train_images_per_s": line["train_images_per_s"],
                        "train_data_wait_frac": line["train_data_wait_frac"], "max_mem_mb": line["max_mem_mb"],
                        "data_wait_frac_after_first_window": (statistics.mean(windows[1:]) / 100
                                                              if len(windows) > 1 else None),
                        "wall_s": round(wall, 1)}
        log(f"main_pretrain.py --data_backend {backend}: {line['train_images_per_s']:.0f} images/s, "
            f"data wait {100 * line['train_data_wait_frac']:.1f}% ({wall:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny model, few images, no compile")
    p.add_argument("--out_dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: model,compile,data_path,main_pretrain")
    args = p.parse_args()
    smoke = args.smoke or os.environ.get("SMOKE") == "1"
    cfg = SMOKE if smoke else FULL
    skip = set(filter(None, args.skip.split(",")))
    if smoke:
        device = torch.device("cpu")
        skip.add("compile")  # minutes on a CPU; the slow test tests/test_engine_pretrain.py compiles there
    elif not torch.cuda.is_available():
        raise SystemExit("error: no GPU visible (torch.cuda.is_available() is False); SMOKE=1 runs the CPU smoke mode")
    else:
        device = torch.device("cuda", 0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext
    name = device_name(device)
    cores = os.cpu_count() or 1
    peak = next((v for k, v in VENDOR_BF16_PEAK.items() if k in name), None)
    result = {"device": name, "smoke": smoke, "torch": torch.__version__,
              "torchvision": __import__("torchvision").__version__, "cpu_cores": cores,
              "vendor_bf16_peak_tflops": peak / 1e12 if peak else None, "jpegs": "synthetic (bench_data.py)"}
    start = time.perf_counter()
    log(f"{name}, torch {torch.__version__}, {cores} CPU cores{' (SMOKE)' if smoke else ''}")

    result["matmul"] = measure_matmul(device, cfg["matmul"])
    log(f"matmul {cfg['matmul']}^3 {result['matmul']['dtype']}: {result['matmul']['tflops']:.1f} TFLOP/s")
    measured = result["matmul"]["tflops"] * 1e12
    if "model" not in skip:
        result["model"] = {}
        for compiled in (False, True):
            if compiled and "compile" in skip:
                result["model"]["compiled"] = "skipped" + (" (smoke mode)" if smoke else "")
                continue
            eager = result["model"].get("eager")
            r = model_throughput(cfg, device, compiled, autocast, eager["flops_per_step"] if eager else None)
            for arch in ("mae", "umae"):
                secs = r[arch]["s_per_step"]
                r[arch]["mfu_vendor_peak"] = r["flops_per_step"] / secs / peak if peak else None
                r[arch]["mfu_measured_matmul"] = r["flops_per_step"] / secs / measured
            result["model"]["compiled" if compiled else "eager"] = r
            mfu = r["mae"]["mfu_vendor_peak"]
            log(f"{'compiled' if compiled else 'eager'}: MAE {r['mae']['images_per_s']:.0f} img/s, U-MAE "
                f"{r['umae']['images_per_s']:.0f} img/s, U-MAE/MAE {r['umae_over_mae_time']:.4f}, "
                f"MAE MFU {'n/a' if mfu is None else f'{mfu:.1%}'} (vendor), "
                f"{r['mae']['mfu_measured_matmul']:.1%} (matmul); attention: {r['attention']['kind']}; "
                f"warm-up {r['warmup_and_compile_s']} s")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        unique = bench_data.make_jpeg_folder(Path(tmp) / "unique", cfg["unique_jpegs"], source="synthetic")
        loader_root = linked_folder(unique, Path(tmp) / "loader", cfg["loader_images"])
        (loader_root / "val").mkdir(exist_ok=True)
        log(f"{cfg['unique_jpegs']} synthetic JPEGs written in {time.perf_counter() - t0:.0f} s "
            f"({bench_data.describe_folder(unique)})")
        workers = 1 if smoke else max(1, cores - 1)
        if "data_path" not in skip:
            result["data_path"] = {}
            for backend in data.FILE_BACKENDS:
                r = loader_rate(loader_root, backend, cfg["input_size"], cfg["pretrain_batch"], workers, device)
                result["data_path"][backend] = r
                log(f"data path {backend}: {r['images_per_s']:.0f} images/s with {workers} workers")
        if "main_pretrain" not in skip:
            total = cfg["pretrain_steps"] * cfg["pretrain_batch"]
            root = linked_folder(unique, Path(tmp) / "pretrain", total)
            result["main_pretrain"] = {"steps": cfg["pretrain_steps"], "batch": cfg["pretrain_batch"],
                                       "workers": workers, "compile": False,
                                       "runs": pretrain_runs(cfg, root, device, workers,
                                                             ("gpu",) if smoke else data.FILE_BACKENDS)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "device"
    out = args.out_dir / f"gpu_check_{'smoke_' if smoke else ''}{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
