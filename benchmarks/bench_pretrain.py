"""Pre-training throughput of MAE and U-MAE of the same architecture, measured in one run.

    python benchmarks/bench_pretrain.py --model vit_tiny_patch16 --input_size 32 --patch_size 4 \
        --decoder_embed_dim 128 --decoder_depth 2 --batch_size 128 --device cpu
    python benchmarks/bench_pretrain.py --model vit_base_patch16 --batch_size 256 --amp bf16 --compile

Both models get the same weights and the same synthetic batches; timed blocks alternate between
them so that drift in the machine's speed hits both alike. Prints images/s of each, the
U-MAE / MAE time ratio, and on a GPU the model FLOP utilisation; writes everything to JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from umae_plugin.errors import exit_on_error
from umae_plugin.optim import param_groups_weight_decay
from umae_plugin.registry import build_pretrain_model
from umae_plugin.registry import classifier_arch, pretrain_name
from umae_plugin.runtime import AMP_DTYPES, Runtime, adamw_options, resolve_amp, resolve_device

# Dense bf16 / fp16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "V100": 125e12}


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16", help="encoder: vit_{tiny,small,base,large}_patch16, vit_huge_patch14")
    p.add_argument("--input_size", type=int, default=32)
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--decoder_embed_dim", type=int, default=128)
    p.add_argument("--decoder_depth", type=int, default=2)
    p.add_argument("--decoder_num_heads", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--lambda_unif", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per model, alternating")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", default=None, choices=list(AMP_DTYPES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="benchmarks/results/bench_pretrain.json")
    return p.parse_args()


def build(args, lambda_unif, device):
    torch.manual_seed(0)
    name = pretrain_name("mae", False, classifier_arch(args.model))  # --model: vit_* (or any name of that encoder)
    model = build_pretrain_model(
        name, lambda_unif=lambda_unif, img_size=args.input_size, patch_size=args.patch_size,
        decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    ).to(device)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            **adamw_options(device))  # fused on CUDA, as the training scripts
    step_model = torch.compile(model) if args.compile else model
    return model, step_model, opt


def make_step(step_model, opt, imgs, args, autocast):
    def step():
        with autocast():
            loss, _, _ = step_model(imgs, args.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = get_args()
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    runtime = Runtime(device, amp_dtype, rank=0, world_size=1)
    autocast = runtime.autocast
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)

    runs = {}
    for name, lam in (("mae", 0.0), ("umae", args.lambda_unif)):
        model, step_model, opt = build(args, lam, device)
        runs[name] = {"step": make_step(step_model, opt, imgs, args, autocast), "times": [], "model": model}
        for _ in range(args.warmup):
            runs[name]["step"]()
    for _ in range(args.blocks):
        for name in runs:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                runs[name]["step"]()
            sync(device)
            runs[name]["times"].append(time.perf_counter() - t0)

    with FlopCounterMode(display=False) as counter, autocast():
        loss, _, _ = runs["mae"]["model"](imgs, args.mask_ratio)
        loss.backward()
    flops_per_step = counter.get_total_flops()

    result = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "flops_per_step": flops_per_step}
    for name, run in runs.items():
        sec_per_step = min(run["times"]) / args.steps  # best block: least disturbed by the machine
        result[name] = {"images_per_s": args.batch_size / sec_per_step, "s_per_step": sec_per_step,
                        "block_times_s": run["times"]}
    result["umae_over_mae_time"] = result["umae"]["s_per_step"] / result["mae"]["s_per_step"]
    peak = next((v for k, v in PEAK_FLOPS.items() if k in result["device"]), None)
    if peak and device.type == "cuda":
        for name in runs:
            result[name]["mfu"] = flops_per_step / result[name]["s_per_step"] / peak

    for name in runs:
        mfu = f", MFU {result[name]['mfu']:.1%}" if "mfu" in result[name] else ""
        print(f"{name:5s} {result[name]['images_per_s']:9.1f} images/s{mfu}")
    print(f"U-MAE / MAE step time: {result['umae_over_mae_time']:.4f} "
          f"({(result['umae_over_mae_time'] - 1) * 100:+.2f}%) on {result['device']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    exit_on_error(main)  # e.g. DeviceError: --device cuda without a GPU, no silent CPU benchmark
