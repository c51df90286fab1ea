"""Evaluation measures: the paper's collapse measure and classification accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def singular_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Singular values [min(n, d)] of the row-L2-normalised [n, d] feature matrix, in float64,
    largest first."""
    z = F.normalize(features.detach().double(), dim=1)
    return torch.linalg.svdvals(z)


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, 2007) of L2-normalised features, the paper's collapse
    measure (appendix B.1): with singular values s and p = s / sum(s), exp(-sum p log p).
    Between 1 (all rows parallel) and min(n, d) (equal singular values)."""
    s = singular_spectrum(features)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, per k (tensors, no host sync);
    k is capped at the number of classes."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk]
