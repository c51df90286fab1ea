import math

import pytest
import torch

from umae_plugin.losses import coding_rate_loss, uniformity_loss


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


# ---------------------------------------------------------------------------------------------
# M-MAE's coding-rate term: -logdet(I_D + mu / D * S), S = Z^T Z (or Z^T J Z centred)


def test_coding_rate_orthonormal_columns():
    """A random orthogonal [D, D] matrix has unit rows and orthonormal columns: S = I."""
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    for mu in (1.0, 3.0):
        torch.testing.assert_close(coding_rate_loss(q, mu=mu), torch.tensor(-16 * math.log(1 + mu / 16), dtype=torch.float64))


def test_coding_rate_rank_one_closed_forms():
    """B parallel rows: S = B u u^T, one eigenvalue B; centred, S = 0."""
    u = torch.randn(1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = u.expand(5, -1) * torch.tensor([[0.5], [1.0], [2.0], [3.0], [7.0]], dtype=torch.float64)
    torch.testing.assert_close(coding_rate_loss(rows, mu=2.0), torch.tensor(-math.log(1 + 2.0 * 5 / 8), dtype=torch.float64))
    torch.testing.assert_close(coding_rate_loss(rows, mu=2.0, centering=True), torch.tensor(0.0, dtype=torch.float64))


def test_coding_rate_equals_explicit_logdet_and_is_row_scale_invariant():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(12, 6, dtype=torch.float64, generator=g)
    z = f / f.norm(dim=1, keepdim=True)
    j = torch.eye(12, dtype=torch.float64) - torch.ones(12, 12, dtype=torch.float64) / 12  # formed here only
    for centering, s in ((False, z.t() @ z), (True, z.t() @ j @ z)):
        expected = -torch.logdet(torch.eye(6, dtype=torch.float64) + 3.0 / 6 * s)
        torch.testing.assert_close(coding_rate_loss(f, mu=3.0, centering=centering), expected)
        scaled = f * torch.rand(12, 1, dtype=torch.float64, generator=g).add(0.1)
        torch.testing.assert_close(coding_rate_loss(scaled, mu=3.0, centering=centering), expected)


def test_coding_rate_gradient_matches_finite_differences():
    f = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: coding_rate_loss(x, mu=3.0), (f,))
    assert torch.autograd.gradcheck(lambda x: coding_rate_loss(x, mu=0.5, centering=True), (f,))


def test_coding_rate_float32_under_autocast_and_bounds():
    f = torch.randn(32, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = coding_rate_loss(f, mu=3.0)
    assert loss.dtype == torch.float32
    # trace(S) = B bounds the uncentred value: spread evenly at one end, parallel rows at the other
    assert -8 * math.log(1 + 3.0 * 32 / 64) - 1e-5 <= float(loss) <= -math.log(1 + 3.0 * 32 / 8)


def test_coding_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="B, D"):
        coding_rate_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mu must be > 0"):
        coding_rate_loss(torch.randn(4, 3), mu=0.0)

