import pytest
import torch

from umae_plugin.losses import uniformity_loss


def test_identical_rows_give_one():
    f = torch.randn(1, 16).expand(8, -1) * torch.rand(8, 1).add(0.1)
    torch.testing.assert_close(uniformity_loss(f), torch.tensor(1.0))


def test_orthonormal_rows_give_one_over_batch():
    q, _ = torch.linalg.qr(torch.randn(32, 8, dtype=torch.float64))
    torch.testing.assert_close(uniformity_loss(q.t().float() * 3.0), torch.tensor(1 / 8))


def test_scale_invariance_and_closed_form():
    f = torch.randn(6, 5)
    z = f / f.norm(dim=1, keepdim=True)
    expected = ((z @ z.t()) ** 2).sum() / 36
    torch.testing.assert_close(uniformity_loss(f), expected)
    torch.testing.assert_close(uniformity_loss(f * torch.rand(6, 1).add(0.5)), expected)


def test_gradient_matches_finite_differences():
    f = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: uniformity_loss(x).double(), (f,))


def test_float32_under_autocast():
    f = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uniformity_loss(f).dtype == torch.float32


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="B, D"):
        uniformity_loss(torch.randn(2, 3, 4))
