import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, TensorDataset

from umae_plugin.engine_classify import evaluate, train_one_epoch
from umae_plugin.train_step import NonFiniteLossError

SCHEDULE = dict(lr=0.1, min_lr=0.0, warmup_epochs=1, epochs=4)


def loader(n=24, dim=6, classes=3, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_epoch_returns_means_and_follows_the_schedule():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = CountingSGD(model.parameters(), lr=0.0)
    stats = train_one_epoch(model, nn.CrossEntropyLoss(), loader(), opt, device=torch.device("cpu"), epoch=2,
                            accum_iter=2, print_freq=4, **SCHEDULE)
    assert opt.steps == 3  # 6 steps, one update every 2
    # the lr is set at steps 0, 2, 4 from the fractional epoch: cosine after the 1-epoch warm-up
    lrs = [0.5 * 0.1 * (1 + math.cos(math.pi * (2 + s / 6 - 1) / 3)) for s in (0, 0, 2, 2, 4, 4)]
    assert stats["lr"] == pytest.approx(sum(lrs) / 6)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    assert stats["loss"] > 0 and set(stats) == {"loss", "lr"}


def test_accumulated_gradients_equal_one_big_batch():
    """accum_iter 2 over batches of 4 steps like one batch of 8 (same mean loss)."""
    torch.manual_seed(0)
    a = nn.Linear(6, 3)
    b = nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    sched = dict(lr=0.5, min_lr=0.5, warmup_epochs=0, epochs=1)
    for model, batch, accum in ((a, 4, 2), (b, 8, 1)):
        train_one_epoch(model, nn.CrossEntropyLoss(), loader(n=8, batch=batch), torch.optim.SGD(model.parameters(), lr=0.0),
                        device=torch.device("cpu"), epoch=0, accum_iter=accum, **sched)
    torch.testing.assert_close(a.weight, b.weight)


def test_clip_grad_bounds_the_step():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    big = lambda logits, target: 1e4 * F.cross_entropy(logits, target)  # noqa: E731
    sched = dict(lr=1.0, min_lr=1.0, warmup_epochs=0, epochs=1)
    train_one_epoch(model, big, loader(n=4), torch.optim.SGD(model.parameters(), lr=0.0), device=torch.device("cpu"),
                    epoch=0, clip_grad=0.5, **sched)
    step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before)))
    assert step.item() == pytest.approx(0.5, rel=1e-4)  # lr 1 times the clipped norm


def test_mixup_with_soft_target_loss():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    mixup = Mixup(mixup_alpha=0.8, num_classes=3, label_smoothing=0.1)
    images = loader(n=8)
    # Mixup works on image batches [B, C, H, W]: wrap the features as 1x1 images
    data = DataLoader(TensorDataset(images.dataset.tensors[0][:, :, None, None], images.dataset.tensors[1]), batch_size=4)
    net = nn.Sequential(nn.Flatten(), model)
    stats = train_one_epoch(net, SoftTargetCrossEntropy(), data, torch.optim.SGD(net.parameters(), lr=0.0),
                            device=torch.device("cpu"), epoch=0, mixup_fn=mixup, **SCHEDULE)
    assert math.isfinite(stats["loss"])


def test_non_finite_loss_raises_at_the_print_step():
    model = nn.Linear(6, 3)
    calls = []

    def criterion(logits, target):
        calls.append(1)
        return F.cross_entropy(logits, target) * (float("nan") if len(calls) == 2 else 1.0)

    with pytest.raises(NonFiniteLossError, match="step 1"):
        train_one_epoch(model, criterion, loader(), torch.optim.SGD(model.parameters(), lr=0.0),
                        device=torch.device("cpu"), epoch=0, print_freq=2, **SCHEDULE)
    assert len(calls) == 2  # stopped at the first print step after the bad loss


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Linear(6, 7)
    data = loader(n=30, classes=7, batch=8)
    stats = evaluate(model, data, torch.device("cpu"))
    x, y = data.dataset.tensors
    with torch.no_grad():
        logits = model(x)
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # how many classes beat the target
    assert stats["acc1"] == pytest.approx((ranks < 1).float().mean().item())
    assert stats["acc5"] == pytest.approx((ranks < 5).float().mean().item())
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert not model.training


# ---------------------------------------------------------------------------------------------
# unreadable images: counted once per epoch over DataLoader workers


def _folder_with_a_corrupt_image(tmp_path):
    from umae_plugin.data import make_synthetic_imagefolder

    root = make_synthetic_imagefolder(tmp_path / "data", num_classes=3, per_class=4, size=12, splits=("train",))
    bad = root / "train" / "class_1" / "2.png"
    bad.write_bytes(b"not a png at all" * 4)
    return root, bad


def _warnings_naming(caplog, path):
    return [r for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


def test_bad_images_are_counted_once_per_epoch_over_workers(tmp_path, caplog):
    from umae_plugin import data

    root, bad = _folder_with_a_corrupt_image(tmp_path)
    ds = data.build_dataset("imagefolder", root, "train", data.eval_transform(8))
    train = data.build_loader(ds, 3, train=True, num_workers=2, pin_memory=False, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for epoch in (0, 1):
        caplog.clear()
        data.set_epoch(train, epoch)
        with caplog.at_level(logging.WARNING):
            stats = train_one_epoch(model, nn.CrossEntropyLoss(), train, opt, device=torch.device("cpu"),
                                    epoch=epoch, **SCHEDULE)
        assert stats["bad_images"] == 1, epoch
        assert len(_warnings_naming(caplog, bad)) == 1, epoch


def test_no_bad_images_key_without_bad_images(tmp_path):
    from umae_plugin import data

    root = data.make_synthetic_imagefolder(tmp_path / "ok", num_classes=2, per_class=3, size=8, splits=("train",))
    ds = data.build_dataset("imagefolder", root, "train", data.eval_transform(8))
    train = data.build_loader(ds, 2, train=True, num_workers=0, pin_memory=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    stats = train_one_epoch(model, nn.CrossEntropyLoss(), train, torch.optim.SGD(model.parameters(), lr=0.0),
                            device=torch.device("cpu"), epoch=0, **SCHEDULE)
    assert set(stats) == {"loss", "lr"} and train.bad_images == 0


def test_bad_image_count_is_summed_over_ranks(tmp_path, monkeypatch):
    from umae_plugin import data

    root, _ = _folder_with_a_corrupt_image(tmp_path)
    ds = data.build_dataset("imagefolder", root, "train", data.eval_transform(8))
    train = data.build_loader(ds, 3, train=True, num_workers=0, pin_memory=False)
    sum(len(y) for _, y in train)
    assert train.bad_images == 1 and data.epoch_bad_images(train) == 1
    reduced = []
    monkeypatch.setattr(data, "get_world_size", lambda: 3)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: reduced.append(t) or t.mul_(3))
    assert data.epoch_bad_images(train) == 3 and len(reduced) == 1  # three ranks that met one each
    assert data.epoch_bad_images(loader()) is None  # loaders that do not count: no collective call
    assert len(reduced) == 1
