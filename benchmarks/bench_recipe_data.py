"""End-to-end vs model-only pre-training throughput at the CIFAR-10 recipe's exact flags, one process.

    python benchmarks/bench_recipe_data.py --data_path /tmp/umae-data/cifar10     # ~6 min on 2 CPU cores

The recipe's model and step (`recipes/cifar10_paired.py`: ViT-Tiny, 32 px, patch 4, 128-d 2-block
decoder, norm-pix, mask 0.75, batch 128, AdamW, lambda 0, three online probes on the masked pass)
are timed with batches from each input pipeline: `model_only` (one batch already on the device,
reused: no data cost), `pil` with 0 / 1 / 2 loader workers, `tensor` with 2 and `memory` (the set
decoded once into a tensor). Timed blocks of `--steps` steps alternate between the pipelines,
`--blocks` rounds, after one warm-up block each; the report gives each pipeline's median images/s
and its ratio to `model_only` measured in the same run (reported, not asserted). Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from umae_plugin import checkpoint, data, data_memory, pretrain  # noqa: E402
from umae_plugin.engine_pretrain import OnlineProbes, probe_losses  # noqa: E402
from umae_plugin.features import TokenTap  # noqa: E402
from umae_plugin.optim import param_groups_weight_decay  # noqa: E402
from umae_plugin.train_step import accumulation_step  # noqa: E402

RECIPE = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--decoder_embed_dim", "128",
          "--decoder_depth", "2", "--decoder_num_heads", "4", "--norm_pix_loss", "--mask_ratio", "0.75",
          "--lambda_unif", "0", "--batch_size", "128", "--weight_decay", "0.05", "--lr", "1e-3"]
PIPELINES = ("model_only", "pil0", "pil1", "pil2", "tensor2", "memory")


def loaders(root: Path, batch: int, names: tuple[str, ...]) -> dict:
    out = {}
    for name in names:
        if name == "model_only":
            continue
        if name == "memory":
            start = time.perf_counter()
            out[name] = data_memory.build_memory_loader(data_memory.source_dataset("imagefolder", root), batch,
                                                        input_size=32, device="cpu", seed=0, num_workers=2)
            print(f"memory: decoded in {time.perf_counter() - start:.1f} s", flush=True)
            continue
        backend, workers = name.rstrip("0123456789"), int(name[-1])
        ds = data.build_pretrain_dataset("imagefolder", root, 32, backend)
        out[name] = data.build_pretrain_loader(ds, batch, backend=backend, device="cpu", input_size=32,
                                               num_workers=workers, pin_memory=False, seed=0)
    return out


class Batches:
    """Endless batches of a loader, epoch after epoch."""

    def __init__(self, loader) -> None:
        self.loader, self.epoch, self.it = loader, 0, None

    def next(self):
        while True:
            if self.it is None:
                data.set_epoch(self.loader, self.epoch)
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", type=Path, default=Path("/tmp/umae-data/cifar10"))
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed rounds (each pipeline once per round)")
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_recipe_data_cpu.json")
    args = p.parse_args()
    names = tuple(args.pipelines.split(","))
    rargs = pretrain.get_args_parser().parse_args(RECIPE)
    torch.manual_seed(0)
    model = checkpoint.build_model(pretrain.pretrain_model_args(rargs)).train()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    probes = OnlineProbes(model.embed_dim, 10)
    probe_opt = torch.optim.AdamW(probes.parameters(), lr=1e-3, weight_decay=0.0)
    tap = TokenTap(model.norm)
    sources = {n: Batches(loader) for n, loader in loaders(args.data_path, 128, names).items()}
    fixed = next(iter(sources.values())).next() if sources else (torch.zeros(128, 3, 32, 32, dtype=torch.uint8),
                                                                  torch.zeros(128, dtype=torch.long))

    def block(name: str, steps: int) -> float:
        start = time.perf_counter()
        for step in range(steps):
            imgs, targets = fixed if name == "model_only" else sources[name].next()
            imgs = data.normalize_pixels(imgs)
            accumulation_step(model, opt, lambda: model(imgs, 0.75, return_terms=True), step=step, accum_iter=1)
            loss = torch.stack(list(probe_losses(probes, tap.features(probes.names), targets).values())).sum()
            probe_opt.zero_grad(set_to_none=True)
            loss.backward()
            probe_opt.step()
        return steps * 128 / (time.perf_counter() - start)

    for name in names:  # warm-up: workers started, caches filled
        block(name, 2)
    rates = {n: [] for n in names}
    for r in range(args.blocks):
        for name in names:
            rates[name].append(block(name, args.steps))
        print(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names), flush=True)
    median = {n: statistics.median(v) for n, v in rates.items()}
    base = median.get("model_only")
    result = {
        "setting": "recipes/cifar10_paired.py e20 flags: " + " ".join(RECIPE) + "; three online probes; CPU float32",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "steps_per_block": args.steps, "blocks": args.blocks, "images_per_s_blocks": rates,
        "images_per_s_median": {n: round(v, 1) for n, v in median.items()},
        "ratio_to_model_only": {n: round(v / base, 3) for n, v in median.items()} if base else {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images_per_s_median", "ratio_to_model_only")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
