import torch

from umae_plugin.metrics import effective_rank, topk_correct


def test_rank_one_gives_one():
    f = torch.randn(1, 10) * torch.rand(20, 1).add(0.1)
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
