"""Loss functions beside the models: plain functions, no modules, no state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_gather_with_grad


def uniformity_loss(features: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """U-MAE's uniformity term: the mean squared cosine similarity over the (global) batch.

    features: [B, D] local features. Rows are L2-normalised, the [B_global, B_global] cosine
    similarity matrix of the batch gathered from every rank (when `torch.distributed` is
    initialised with several ranks and `gather` is set) is formed, and the mean of its squared
    entries, diagonal included as in the reference, is returned. Identical rows give 1; B
    orthonormal rows give 1/B. Computed in float32 (float64 inputs stay float64) whatever the autocast context.

    The gather is differentiable end to end (see `distributed.all_gather_with_grad`): after DDP's
    gradient averaging every rank holds the gradient of this loss on the concatenated batch.
    The U-MAE reference keeps only the local slice's gradient, which scales the term's gradient by
    1/world_size: its lambda on W GPUs equals lambda / W here.
    """
    if features.dim() != 2:
        raise ValueError(f"uniformity_loss expects [B, D] features, got shape {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = F.normalize(features if features.dtype == torch.float64 else features.float(), dim=1)
        if gather:
            z = all_gather_with_grad(z)
        return (z @ z.t()).pow(2).mean()
