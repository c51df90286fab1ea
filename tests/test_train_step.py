import pytest
import torch
import torch.nn as nn

from umae_plugin.train_step import NonFiniteLossError, backward, check_finite, optimizer_step


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
