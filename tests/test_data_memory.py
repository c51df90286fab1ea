"""`--data_backend memory` (umae_plugin.data_memory): the pil backend's draws exactly (boxes and
flips per (seed, epoch, index), via torchvision's own `get_params`), values close to PIL's resampling,
exact resume, refusals, and a short pre-training that resumes bitwise."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import main_pretrain
from umae_plugin import data, data_memory
from umae_plugin.data import build_loader, build_pretrain_dataset, sample_seed


@pytest.fixture(scope="module")
def same_size(tmp_path_factory):
    """An image folder of 16 smooth 32 x 32 RGB PNGs (lossless: the decode is exact), 2 classes."""
    root = tmp_path_factory.mktemp("same_size")
    rng = np.random.default_rng(0)
    for n in range(16):
        folder = root / "train" / f"class_{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.Resampling.BICUBIC).save(folder / f"{n:02d}.png")
    return root


def memory_loader(root, batch=4, seed=5, size=32):
    return data_memory.build_memory_loader(data_memory.source_dataset("imagefolder", root), batch, input_size=size,
                                           device="cpu", seed=seed)


def pil_batches(root, epoch, batch=4, seed=5, size=32):
    loader = build_loader(build_pretrain_dataset("imagefolder", root, size, "pil"), batch, train=True, num_workers=0,
                          pin_memory=False, seed=seed)
    data.set_epoch(loader, epoch)
    return list(loader)


def test_boxes_are_torchvisions_get_params_for_the_per_sample_generator():
    """An independent draw: a generator seeded with the sample's seed, torchvision's get_params fed
    from it (torch's global generator is what get_params reads), then the flip's torch.rand(1)."""
    boxes, flips = data_memory.crop_boxes(32, 32, seed=7, epoch=3, indices=[0, 5, 11, 11])
    for k, index in enumerate([0, 5, 11, 11]):
        g = torch.Generator().manual_seed(sample_seed(7, 3, index))
        area = 32 * 32
        for _ in range(10):  # torchvision's loop, written out with an explicit generator
            target = area * torch.empty(1).uniform_(0.2, 1.0, generator=g).item()
            log_r = torch.log(torch.tensor([3 / 4, 4 / 3]))
            aspect = torch.exp(torch.empty(1).uniform_(log_r[0], log_r[1], generator=g)).item()
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= 32 and 0 < h <= 32:
                i = torch.randint(0, 32 - h + 1, size=(1,), generator=g).item()
                j = torch.randint(0, 32 - w + 1, size=(1,), generator=g).item()
                break
        else:
            raise AssertionError("no box in 10 tries")
        assert boxes[k].tolist() == [i, j, h, w]
        assert bool(flips[k]) == bool(torch.rand(1, generator=g) < 0.5)
    assert torch.equal(boxes[2], boxes[3])  # the same sample, the same draw
    state = torch.get_rng_state()
    data_memory.crop_boxes(32, 32, seed=7, epoch=3, indices=[1])
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was


def test_memory_batches_follow_the_pil_backend_closely(same_size):
    """Same images, order and draws as the pil backend; the resampler is torch's port of PIL's
    antialiased bicubic: within a level or two everywhere, where a different box or flip would
    differ by tens of levels."""
    loader = memory_loader(same_size)
    assert len(loader) == 4
    data.set_epoch(loader, 2)
    mem = list(loader)
    pil = pil_batches(same_size, 2)
    assert len(mem) == len(pil) == 4
    diffs = []
    for (a, ta), (b, tb) in zip(pil, mem):
        assert b.dtype == torch.uint8 and b.shape == a.shape == (4, 3, 32, 32) and torch.equal(ta, tb)
        diffs.append((a.float() - b.float()).abs().mean().item())
        assert (a.float() - b.float()).abs().max() <= 2
    assert max(diffs) < 0.1, diffs


def test_memory_loader_is_a_function_of_seed_and_epoch(same_size):
    """A fresh loader (a resumed run) at epoch 3 gives bitwise the batches of one that ran epochs 0-2."""
    ran = memory_loader(same_size)
    for epoch in range(3):
        data.set_epoch(ran, epoch)
        list(ran)
    data.set_epoch(ran, 3)
    fresh = memory_loader(same_size)
    data.set_epoch(fresh, 3)
    for (a, ta), (b, tb) in zip(ran, fresh):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    data.set_epoch(fresh, 4)
    other = list(fresh)
    data.set_epoch(ran, 3)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(ran, other))


def test_refusals_name_the_problem(same_size, tmp_path):
    with pytest.raises(data.UsageError, match="over --memory_budget_mb"):
        data_memory.build_memory_loader(data_memory.source_dataset("imagefolder", same_size), 4, input_size=32,
                                        device="cpu", budget_mb=0.01)
    mixed = tmp_path / "mixed"
    for n, size in enumerate((32, 32, 40)):
        (mixed / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (n, 0, 0)).save(mixed / "train" / "a" / f"{n}.png")
    with pytest.raises(data.UsageError, match="images of one size: item 2"):
        data_memory.build_memory_loader(data_memory.source_dataset("imagefolder", mixed), 2, input_size=32,
                                        device="cpu")


def pretrain(out, *extra):
    argv = ["--model", "mae_vit_micro", "--dataset", "digits", "--input_size", "32", "--epochs", "2",
            "--warmup_epochs", "1", "--batch_size", "128", "--device", "cpu", "--num_workers", "0", "--output_dir",
            str(out), "--log_dir", str(out), "--print_freq", "100", "--erank_freq", "0", "--data_backend", "memory",
            "--save_freq", "1", *extra]
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


def test_pretraining_with_the_memory_backend_resumes_bitwise(tmp_path):
    import shutil

    from umae_plugin import checkpoint as ckpt
    full = tmp_path / "full"
    pretrain(full)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "checkpoint-0.pth", part / "checkpoint-last.pth")  # a run stopped after epoch 0
    pretrain(part, "--resume", "auto")
    a, b = ckpt.torch_load(full / "checkpoint-last.pth"), ckpt.torch_load(part / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    line = json.loads((full / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(line["train_loss"]) and line["train_images_per_s"] > 0


def test_the_memory_backend_leaves_the_initial_weights_as_the_pil_backend_does(tmp_path):
    """Decoding the set draws nothing from the global generator: at lr 0 (AdamW moves nothing) the
    model after one epoch is, bitwise, the one the pil backend's run starts from with the same seed."""
    from umae_plugin import checkpoint as ckpt
    states = {}
    for backend in ("pil", "memory"):
        out = tmp_path / backend
        argv = ["--model", "mae_vit_micro", "--dataset", "digits", "--input_size", "32", "--epochs", "1",
                "--warmup_epochs", "1", "--batch_size", "128", "--lr", "0", "--device", "cpu", "--num_workers", "0",
                "--output_dir", str(out), "--log_dir", str(out), "--erank_freq", "0", "--data_backend", backend,
                "--seed", "4"]
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
        states[backend] = ckpt.torch_load(out / "checkpoint-last.pth")["model"]
    for k in states["pil"]:
        assert torch.equal(states["pil"][k], states["memory"][k]), k
