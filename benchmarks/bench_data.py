"""Images/s per CPU core of the pre-training input pipelines, the reference's and ours, measured in
one run (alternating passes), plus the end-to-end data-wait fraction of `main_pretrain.py`.

    python benchmarks/bench_data.py                  # ~1-2 min: 256 JPEGs, 7 alternating rounds
    python benchmarks/bench_data.py --smoke          # seconds (tests): 24 JPEGs, 2 rounds, no main_pretrain

Images: ImageNet-like JPEGs written here, quality 90, sides 300-500 px: random windows of the two
photos scikit-learn ships (`load_sample_images()`, 427x640), each photo first rescaled by a random
factor in [0.75, 1.2] (bicubic); `--source synthetic` (no scikit-learn: the GPU check) paints smooth
noise and colour gradients with fine grain instead. Half the files are in each of two classes.

Pipelines, each a `DataLoader` with ONE worker process (torch runs one thread there) and the main
process set to one thread, so images/s is per core:
- `reference`: the MAE reference's `datasets.ImageFolder` (PIL decode) with RandomResizedCrop(224,
  scale 0.2-1.0, bicubic), flip, ToTensor, Normalize in the worker; float32 batches.
- `pil`: ours by default: the same PIL work, uint8 batches (`normalize_pixels` on the device);
  bitwise the reference's values.
- `tensor`: torchvision's JPEG decoder + torch's uint8 bicubic antialiased resize in the worker.
- `gpu_workers`: the `gpu` backend's worker side alone (file bytes + crop draws; the device decodes).
- `gpu_on_cpu`: the `gpu` backend end to end with the CPU as the device (the main thread decodes,
  crops and flips while the worker reads the next files): what CI runs, not a GPU figure.
Ratios are medians over rounds of (pipeline's images/s / the reference's in the same round).

End to end: `main_pretrain.py` with a small ViT (224 px, patch 16, 64-d, 2 blocks) for one epoch
over the same files with each backend, one worker, one model thread (`OMP_NUM_THREADS=1`);
`train_data_wait_frac` and `train_images_per_s` from its log.txt. On a shared 2-core CPU the model step is slow, so the wait is small: the GPU
check measures it where it matters.

Writes benchmarks/results/bench_data_cpu.json (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a bare checkout (the GPU machine): import the package from there
    sys.path.insert(0, str(ROOT))

from umae_plugin import data  # noqa: E402

PIPELINES = ("reference", "pil", "tensor", "gpu_workers", "gpu_on_cpu")


# ---------------------------------------------------------------------------------------------
# images


def _sample_photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise SystemExit("error: --source sample needs scikit-learn (pip install scikit-learn), "
                         "or pass --source synthetic") from err
    return list(load_sample_images().images)


def _sample_image(photos: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """A random window, 300-500 px a side, of a randomly rescaled sample photo."""
    photo = Image.fromarray(photos[int(rng.integers(len(photos)))])
    f = rng.uniform(0.75, 1.2)
    photo = photo.resize((round(photo.width * f), round(photo.height * f)), Image.Resampling.BICUBIC)
    h = int(rng.integers(300, min(500, photo.height) + 1))
    w = int(rng.integers(300, min(500, photo.width) + 1))
    top, left = int(rng.integers(photo.height - h + 1)), int(rng.integers(photo.width - w + 1))
    return photo.crop((left, top, left + w, top + h))


def _synthetic_image(rng: np.random.Generator) -> Image.Image:
    """Smooth colour noise (bicubic upsampling of a coarse grid) plus two colour gradients and fine
    grain, 300-500 px a side: compresses like a photo without needing one."""
    h, w = (int(v) for v in rng.integers(300, 501, size=2))
    coarse = rng.uniform(0, 255, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ramps = (x / w)[..., None] * rng.uniform(-80, 80, 3) + (y / h)[..., None] * rng.uniform(-80, 80, 3)
    pixels = 0.7 * smooth + ramps + rng.normal(0, 6, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_jpeg_folder(root: Path, num: int, source: str = "sample", seed: int = 0) -> Path:
    """`num` JPEGs (quality 90) in `root/train/class_{0,1}/` (and one per class in `root/val/`);
    returns `root`. `source`: "sample" (scikit-learn's photos) or "synthetic"."""
    rng = np.random.default_rng(seed)
    photos = _sample_photos() if source == "sample" else None
    for split, count in (("train", num), ("val", 2)):
        for n in range(count):
            folder = root / split / f"class_{n % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            img = _sample_image(photos, rng) if photos is not None else _synthetic_image(rng)
            img.save(folder / f"{n:05d}.jpg", quality=90)
    return root


def describe_folder(root: Path) -> dict:
    files = sorted((root / "train").glob("*/*.jpg"))
    sizes = [Image.open(f).size for f in files]
    return {"files": len(files), "mean_kb": round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1),
            "width_range": [min(s[0] for s in sizes), max(s[0] for s in sizes)],
            "height_range": [min(s[1] for s in sizes), max(s[1] for s in sizes)]}


# ---------------------------------------------------------------------------------------------
# pipelines


def reference_transform(size: int) -> transforms.Compose:
    """The MAE reference's `transform_train` (main_pretrain.py)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def build_pipelines(root: Path, size: int, batch: int, workers: int, names=PIPELINES) -> dict:
    """{name: iterable loader} of persistent-worker loaders over `root/train`."""
    out = {}
    for name in names:
        if name == "reference":
            ds = datasets.ImageFolder(str(root / "train"), transform=reference_transform(size))
            out[name] = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                   persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
            continue
        backend = {"pil": "pil", "tensor": "tensor", "gpu_workers": "gpu", "gpu_on_cpu": "gpu"}[name]
        ds = data.build_pretrain_dataset("imagefolder", root, size, backend)
        if name == "gpu_workers":  # the worker side only: batches of file bytes and draws
            out[name] = data.build_loader(ds, batch, train=True, num_workers=workers, pin_memory=False)
        else:  # gpu_on_cpu: the main thread decodes (no prefetch thread: one core for it)
            loader = data.build_pretrain_loader(ds, batch, backend=backend, device="cpu", input_size=size,
                                                num_workers=workers, pin_memory=False)
            if isinstance(loader, data.DeviceDecodeLoader):
                loader.prefetch = False
            out[name] = loader
    return out


def time_pass(loader, epoch: int) -> float:
    """Images/s of one pass over `loader` (its sampler reseeded for `epoch`)."""
    data.set_epoch(loader, epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def measure(root: Path, size: int, batch: int, rounds: int, names=PIPELINES) -> dict:
    torch.set_num_threads(1)
    loaders = build_pipelines(root, size, batch, workers=1, names=names)
    for name, loader in loaders.items():  # warm-up: worker start, first imports
        time_pass(loader, 0)
    rates: dict[str, list[float]] = {n: [] for n in loaders}
    for r in range(rounds):
        order = list(loaders) if r % 2 == 0 else list(loaders)[::-1]  # alternate the order too
        for name in order:
            rates[name].append(time_pass(loaders[name], r + 1))
    result = {}
    for name, values in rates.items():
        paired = [v / ref for v, ref in zip(values, rates["reference"])]
        result[name] = {"images_per_s_per_core": round(statistics.median(values), 1),
                        "rounds": [round(v, 1) for v in values],
                        "ratio_to_reference": round(statistics.median(paired), 3)}
    return result


def tensor_vs_pil(root: Path, size: int, batch: int) -> dict:
    """Mean / max absolute difference (of 255 levels) between the `tensor` and `pil` backends'
    uint8 batches for the same seed (the same crops): how close "close to PIL's" is."""
    loaders = [data.build_pretrain_loader(data.build_pretrain_dataset("imagefolder", root, size, b), batch, backend=b,
                                          device="cpu", input_size=size, num_workers=0, pin_memory=False)
               for b in ("pil", "tensor")]
    diffs = [(a.float() - b.float()).abs() for (a, _), (b, _) in zip(*loaders)]
    return {"mean_abs_diff": round(float(torch.cat([d.flatten() for d in diffs]).mean()), 4),
            "max_abs_diff": int(max(d.max() for d in diffs)),
            "share_of_values_equal": round(float(torch.cat([(d == 0).flatten() for d in diffs]).float().mean()), 4)}


# ---------------------------------------------------------------------------------------------
# end to end: main_pretrain.py's data-wait fraction


def end_to_end(root: Path, size: int, batch: int, backends=("pil", "tensor", "gpu"), device: str = "cpu",
               extra: tuple[str, ...] = (), workers: int = 1, epochs: int = 1) -> dict:
    """One `main_pretrain.py` run per backend; {backend: {train_images_per_s, train_data_wait_frac,
    max_mem_mb, wall_s}} from the last log.txt line."""
    out = {}
    model = ["--model", "mae_vit_tiny_patch16", "--embed_dim", "64", "--depth", "2", "--num_heads", "2",
             "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--patch_size", "16"]
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "main_pretrain.py"), *model, "--input_size", str(size),
                   "--dataset", "imagefolder", "--data_path", str(root), "--batch_size", str(batch),
                   "--epochs", str(epochs), "--warmup_epochs", "1", "--device", device, "--num_workers", str(workers),
                   "--erank_freq", "0", "--print_freq", "10", "--output_dir", tmp, "--log_dir", tmp,
                   "--data_backend", backend, *extra]
            start = time.perf_counter()
            # one thread for the model, one core for the worker: no oversubscription on a small machine
            env = dict(os.environ, OMP_NUM_THREADS="1")
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if run.returncode != 0:
                raise SystemExit(f"error: main_pretrain.py --data_backend {backend} failed:\n{run.stdout[-2000:]}"
                                 f"\n{run.stderr[-3000:]}")
            line = json.loads((Path(tmp) / "log.txt").read_text().splitlines()[-1])
        out[backend] = {k: round(line[k], 4) for k in ("train_images_per_s", "train_data_wait_frac", "max_mem_mb")}
        out[backend]["wall_s"] = round(wall, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="JPEGs to write and read each pass")
    p.add_argument("--rounds", type=int, default=7, help="alternating timed passes per pipeline")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--source", default="sample", choices=["sample", "synthetic"])
    p.add_argument("--no_end_to_end", action="store_true", help="skip the main_pretrain.py runs")
    p.add_argument("--smoke", action="store_true", help="24 JPEGs, 2 rounds, no main_pretrain.py runs (tests)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_data_cpu.json")
    args = p.parse_args()
    if args.smoke:
        args.images, args.rounds, args.batch_size, args.no_end_to_end = 24, 2, 8, True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(tmp) / "jpegs", args.images, args.source)
        images = describe_folder(root)
        print(f"{images['files']} JPEGs ({args.source}), {images['width_range']} x {images['height_range']} px, "
              f"{images['mean_kb']} KB on average", flush=True)
        pipelines = measure(root, args.input_size, args.batch_size, args.rounds)
        for name, r in pipelines.items():
            print(f"{name:12s} {r['images_per_s_per_core']:8.1f} images/s per core   x{r['ratio_to_reference']:.3f} "
                  f"the reference", flush=True)
        closeness = tensor_vs_pil(root, args.input_size, args.batch_size)
        print(f"tensor vs pil (same crops): mean |difference| {closeness['mean_abs_diff']} of 255 levels, max "
              f"{closeness['max_abs_diff']}, {100 * closeness['share_of_values_equal']:.1f}% of values equal", flush=True)
        e2e = None
        if not args.no_end_to_end:
            e2e = end_to_end(root, args.input_size, args.batch_size)
            for backend, r in e2e.items():
                print(f"main_pretrain.py --data_backend {backend}: {r['train_images_per_s']:.1f} images/s, "
                      f"data wait {100 * r['train_data_wait_frac']:.1f}%", flush=True)
    result = {
        "what": "images/s per CPU core of the pre-training input pipelines (1 worker process, 1 thread), "
                "alternating passes in one run; ratio = median over rounds of pipeline / reference",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": images, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
        "pillow": Image.__version__, "pipelines": pipelines, "tensor_vs_pil": closeness,
        "main_pretrain_end_to_end": e2e,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
