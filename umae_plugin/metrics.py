"""Evaluation measures: the paper's collapse measure (and its centred variant) and classification
accuracy."""
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


def effective_rank_centered(features: torch.Tensor) -> float:
    """Effective rank of the centred, L2-normalised features: rows L2-normalised, then the column
    mean subtracted, then `effective_rank`'s formula (exp of the entropy of the normalised singular
    values), in float64. It counts the directions the samples spread along around their mean, so a
    common offset shared by every sample (which the uncentred measure counts as one direction)
    does not count: k distinct points span at most k - 1 dimensions.

    Being scale-free, it would count rounding noise as spread, so singular values below
    `max(n, d) * eps` of the largest (eps of the input's precision, float32's for narrower types:
    numerical rank) are dropped, and it is 0.0 when the normalised rows are all equal to that
    precision (no spread at all)."""
    dtype = features.dtype if features.dtype == torch.float64 else torch.float32
    z = F.normalize(features.detach().double(), dim=1)
    z = z - z.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(z)
    tol = torch.finfo(dtype).eps * max(z.shape)
    if s.numel() == 0 or s[0] <= tol * z.shape[0] ** 0.5:  # unit rows: sqrt(n) is the matrix's scale
        return 0.0
    s = s[s > tol * s[0]]
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, per k (tensors, no host sync);
    k is capped at the number of classes."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in topk]
