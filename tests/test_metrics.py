import torch

from umae_plugin.metrics import effective_rank, effective_rank_centered, topk_correct


def test_rank_one_gives_one():
    f = torch.randn(1, 10, dtype=torch.float64) * torch.rand(20, 1, dtype=torch.float64).add(0.1)
    assert abs(effective_rank(f) - 1.0) < 1e-6


def test_orthonormal_gives_n():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert abs(effective_rank(q) - 12.0) < 1e-6


def test_two_equal_directions():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(5, 1)
    assert abs(effective_rank(f) - 2.0) < 1e-6


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.1, 0.2, 0.7]])
    target = torch.tensor([1, 2, 0])
    top1, top2 = topk_correct(logits, target, (1, 2))
    assert top1.item() == 1 and top2.item() == 2
    assert topk_correct(logits, target, (5,))[0].item() == 3


# ---------------------------------------------------------------------------------------------
# centred effective rank: rows L2-normalised, column mean subtracted, then the same formula


def test_centered_k_cluster_points_span_k_minus_1_dims():
    """k orthonormal points (a regular simplex once centred): k - 1 equal singular values; the
    uncentred measure counts k."""
    for k in (2, 3, 5):
        f = torch.eye(8)[:k].repeat(4, 1) * torch.rand(4 * k, 1).add(0.5)  # any positive scale per row
        assert abs(effective_rank(f) - k) < 1e-6
        assert abs(effective_rank_centered(f) - (k - 1)) < 1e-6


def test_centered_well_separated_clusters_stay_below_k_minus_1():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 10
    f = centres.repeat_interleave(50, 0) + 0.001 * torch.randn(200, 32, generator=g)
    assert 2.0 < effective_rank_centered(f) <= 3.0 + 0.02
    assert effective_rank(f) > effective_rank_centered(f)


def test_centered_equals_uncentred_for_zero_mean_rows_and_orthonormal_columns():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    f = torch.cat([q, -q])  # antipodal pairs: the normalised rows have zero mean
    assert abs(effective_rank_centered(f) - 12.0) < 1e-6 and abs(effective_rank(f) - 12.0) < 1e-6


def test_centered_removes_a_common_offset_the_uncentred_counts():
    """A shared direction plus small spread: uncentred ~1 (the offset dominates), centred sees
    the spread's dimensions."""
    g = torch.Generator().manual_seed(1)
    spread = torch.zeros(400, 16)
    spread[:, 1:5] = torch.randn(400, 4, generator=g)
    f = torch.eye(16)[0] * 1000 + spread
    assert effective_rank(f) < 1.1
    assert 3.5 < effective_rank_centered(f) < 4.05  # (normalising bends the offset axis a little)


def test_centered_of_identical_rows_is_zero():
    """Rank one: every normalised row the same (to float32 rounding, which is not spread)."""
    f = torch.randn(1, 10) * torch.rand(20, 1).add(0.1)
    assert effective_rank_centered(f) == 0.0
    f64 = torch.randn(1, 10, dtype=torch.float64) * torch.rand(20, 1, dtype=torch.float64).add(0.1)
    assert effective_rank_centered(f64) == 0.0 and effective_rank_centered(torch.ones(5, 3)) == 0.0
