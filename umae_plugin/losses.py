"""Loss functions beside the models: plain functions, no modules, no state.

The uniformity family: U-MAE's squared-cosine term (`uniformity_loss`, `--reg square`) and M-MAE's
coding-rate term (`coding_rate_loss`, `--reg TCR`). Both see the rows L2-normalised and, by
default, the global batch gathered from every rank (`gather`):

- `True` / `"global"`: differentiable end to end (`distributed.all_gather_with_grad`): after
  DDP's gradient averaging every rank holds the gradient of the loss on the concatenated batch,
  whatever the number of ranks.
- `"reference"`: the U-MAE / M-MAE reference's gather (`distributed.all_gather_local_grad`),
  whose backward keeps only the local slice: the term's gradient is 1/world_size of the above,
  so a reference run on W GPUs is reproduced with its own lambda.
- `False`: this rank's rows only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_features


def _unit_rows(features: torch.Tensor, gather: bool | str, name: str) -> torch.Tensor:
    """[B, D] -> L2-normalised rows in float32 (float64 stays float64), gathered per `gather`.
    Call inside a disabled autocast."""
    if features.dim() != 2:
        raise ValueError(f"{name} expects [B, D] features, got shape {tuple(features.shape)}")
    z = F.normalize(features if features.dtype == torch.float64 else features.float(), dim=1)
    if gather is False:
        return z
    return gather_features(z, "global" if gather is True else gather)


def uniformity_loss(features: torch.Tensor, gather: bool | str = True) -> torch.Tensor:
    """U-MAE's uniformity term: the mean squared cosine similarity over the (global) batch.

    features: [B, D] local features. Rows are L2-normalised, the [B_global, B_global] cosine
    similarity matrix of the batch gathered from every rank (see the module docstring for
    `gather`) is formed, and the mean of its squared entries, diagonal included as in the
    reference, is returned. Identical rows give 1; B orthonormal rows give 1/B. Computed in
    float32 (float64 inputs stay float64) whatever the autocast context.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = _unit_rows(features, gather, "uniformity_loss")
        return (z @ z.t()).pow(2).mean()


def coding_rate_loss(features: torch.Tensor, mu: float = 1.0, centering: bool = False,
                     gather: bool | str = True) -> torch.Tensor:
    """M-MAE's coding-rate term (Tan et al., "Information Flow in Self-Supervised Learning", 2024):
    minus the total coding rate of the (global) batch.

    features: [B, D] local features. Rows are L2-normalised and gathered (see the module
    docstring) into Z [B_global, D]; S = Z^T Z [D, D], or with `centering` (Z - mean_rows(Z))^T
    (Z - mean_rows(Z)), which equals Z^T J Z with J = I_B - 1 1^T / B without forming the [B, B]
    J. Returns -logdet(I_D + (mu / D) S), D the feature dimension as in M-MAE's code (its comment
    says B). Uncentred, trace(S) = B bounds it to [-D log(1 + mu B / D^2), -log(1 + mu B / D)]:
    the low end when S = (B / D) I (rows spread evenly; orthonormal columns, S = I, give
    -D log(1 + mu / D)), the high end when all rows are parallel (S of rank one). Centred, equal
    rows give 0.

    Float32 at least (float64 stays float64), outside any autocast; the log-determinant comes
    from a Cholesky factor (I_D + (mu / D) S is symmetric positive definite for mu > 0), as
    2 sum(log diag(L)).
    """
    if not mu > 0:
        raise ValueError(f"coding_rate_loss: mu must be > 0, got {mu}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = _unit_rows(features, gather, "coding_rate_loss")
        dim = z.shape[1]
        if centering:
            z = z - z.mean(dim=0, keepdim=True)
        eye = torch.eye(dim, dtype=z.dtype, device=z.device)
        chol = torch.linalg.cholesky(eye + (mu / dim) * (z.t() @ z))
        return -2.0 * chol.diagonal().log().sum()
