import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from umae_plugin import engine_classify, engine_pretrain
from umae_plugin.registry import create_model
from umae_plugin.train_step import (
    NonFiniteLossError,
    accumulation_context,
    accumulation_step,
    backward,
    check_finite,
    is_update_step,
    optimizer_step,
)


def test_check_finite():
    check_finite(torch.tensor(False), "here")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        check_finite(torch.tensor(True), "at step 3")


def test_accumulated_gradient_equals_full_batch_mean():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for half in (slice(0, 4), slice(4, 8)):
        backward(nn.functional.mse_loss(model(x[half]), y[half]), accum_iter=2, scaler=None)
    accumulated = model.weight.grad.clone()
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    torch.testing.assert_close(accumulated, model.weight.grad)


def test_step_clips_the_global_norm_then_clears():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])  # norm 5
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), clip_grad=1.0)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-0.6, -0.8, 0.0]]))
    assert model.weight.grad is None


# --- gradient accumulation at the end of an epoch, as the MAE reference ---------------------------

CPU = torch.device("cpu")
CONSTANT_LR = dict(lr=1e-2, min_lr=1e-2, warmup_epochs=0, epochs=10)  # same lr whatever len(loader)


def test_update_steps_leave_the_partial_group_out():
    """ImageNet, 64 x 8 GPUs, accum_iter 8: 2502 steps, 312 updates, the last after step 2495,
    6 leftover steps that never update."""
    updates = [s for s in range(2502) if is_update_step(s, 8)]
    assert len(updates) == 312 and updates[-1] == 2495
    assert [is_update_step(s, 3) for s in range(7)] == [False, False, True, False, False, True, False]
    assert all(is_update_step(s, 1) for s in range(5))


class FakeDDP(nn.Linear):
    """Records whether each forward / backward ran inside `no_sync`, as DDP's flag would."""

    def __init__(self) -> None:
        super().__init__(2, 1)
        self.syncing = True
        self.forward_synced: list[bool] = []
        self.backward_synced: list[bool] = []
        self.weight.register_hook(lambda g: self.backward_synced.append(self.syncing))

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.forward_synced.append(self.syncing)
        return super().forward(x)


def test_accumulation_step_skips_the_all_reduce_on_leftover_steps():
    """no_sync on every step that does not update, the end-of-epoch leftovers included; the
    optimiser steps on the updating steps only and the leftover gradient stays unapplied."""
    model = FakeDDP()
    assert isinstance(accumulation_context(model, update=False), contextlib.AbstractContextManager)
    assert isinstance(accumulation_context(model, update=True), contextlib.nullcontext)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 2)
    for step in range(7):
        accumulation_step(model, opt, lambda: model(x).pow(2).mean(), step=step, accum_iter=3)
    expected = [False, False, True, False, False, True, False]
    assert model.forward_synced == expected and model.backward_synced == expected
    assert model.weight.grad is not None  # step 6's gradient: accumulated, never applied


def test_accumulation_step_returns_the_forward_output_and_flags_non_finite():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = torch.zeros((), dtype=torch.bool)
    out = accumulation_step(model, opt, lambda: (model(torch.ones(1, 2)).sum(), "aux"), step=0, accum_iter=2, bad=bad)
    assert out[1] == "aux" and not bad
    accumulation_step(model, opt, lambda: model(torch.ones(1, 2)).sum() * float("inf"), step=1, accum_iter=2, bad=bad)
    assert bad


class RecordingModel(nn.Module):
    """Passes through to the MAE `model`, recording each step's loss (the first output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.losses: list[float] = []

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.losses.append(out[0].item())
        return out


def tiny_mae() -> nn.Module:
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch16", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def batches(shape, batches, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = batches * batch
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g))


def first(dataset: TensorDataset, batches: int, batch=2) -> TensorDataset:
    return TensorDataset(*(t[: batches * batch] for t in dataset.tensors))


class Pretrain:
    shape = (3, 16, 16)

    @staticmethod
    def model():
        return RecordingModel(tiny_mae())

    @staticmethod
    def run(model, opt, dataset, epoch=0, accum_iter=3):
        torch.manual_seed(100 + epoch)  # the same masks in runs compared with each other
        return engine_pretrain.train_one_epoch(model, DataLoader(dataset, batch_size=2), opt, device=CPU, epoch=epoch,
                                               mask_ratio=0.75, schedule=CONSTANT_LR, accum_iter=accum_iter)

    @staticmethod
    def losses(model):
        return model.losses


class Classify:
    shape = (6,)

    @staticmethod
    def model():
        torch.manual_seed(0)
        return nn.Linear(6, 3)

    @staticmethod
    def run(model, opt, dataset, epoch=0, accum_iter=3):
        losses = Classify.recorded.setdefault(id(model), [])

        def criterion(logits, targets):
            loss = F.cross_entropy(logits, targets)
            losses.append(loss.item())
            return loss

        return engine_classify.train_one_epoch(model, criterion, DataLoader(dataset, batch_size=2), opt, device=CPU,
                                               epoch=epoch, accum_iter=accum_iter, **CONSTANT_LR)

    recorded: dict[int, list[float]] = {}

    @staticmethod
    def losses(model):
        return Classify.recorded[id(model)]


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)


def updates(opt) -> set[int]:
    """AdamW's per-parameter step counts: how many times the optimiser applied a gradient."""
    return {int(state["step"]) for state in opt.state.values()}


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("engine", [Pretrain, Classify], ids=["pretrain", "classify"])
def test_epoch_never_applies_the_leftover_partial_group(engine):
    """7 batches, accum_iter 3: 2 updates (floor(7 / 3)), all 7 losses logged, and the parameters
    those of a run on the first 6 batches: the 7th batch's gradient is never applied."""
    data = batches(engine.shape, 7)
    model = engine.model()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    opt = adamw(model)
    stats = engine.run(model, opt, data)
    assert updates(opt) == {2}
    losses = engine.losses(model)
    assert len(losses) == 7
    assert stats["loss"] == pytest.approx(sum(losses) / 7, rel=1e-5)
    assert stats["lr"] == pytest.approx(CONSTANT_LR["lr"])

    ref_opt = adamw(reference)
    ref_stats = engine.run(reference, ref_opt, first(data, 6))
    assert updates(ref_opt) == {2}
    assert engine.losses(reference) == pytest.approx(losses[:6])
    assert ref_stats["loss"] != pytest.approx(stats["loss"], rel=1e-5)  # the 7th loss is in the mean
    assert_same_params(model, reference)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
    assert any(p.grad is not None for p in model.parameters())  # backpropagated, left unapplied


@pytest.mark.parametrize("engine", [Pretrain, Classify], ids=["pretrain", "classify"])
def test_leftover_gradient_is_discarded_at_the_next_epoch_start(engine):
    """The second epoch's first update is the one from zeroed gradients: the epoch-start
    `zero_grad` discards the first epoch's leftover batch."""
    model = engine.model()
    opt = adamw(model)
    engine.run(model, opt, batches(engine.shape, 7))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # the leftover

    clean = copy.deepcopy(model)
    clean_opt = adamw(clean)
    clean_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its step counters are shared otherwise
    for p in clean.parameters():
        p.grad = None
    second = batches(engine.shape, 3, seed=1)
    engine.run(model, opt, second, epoch=1)
    engine.run(clean, clean_opt, second, epoch=1)
    assert updates(opt) == {3}
    assert_same_params(model, clean)
