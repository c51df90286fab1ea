"""Fixed 2-D sine-cosine position tables of the MAE pre-training model.

The reference builds these tables in float64 numpy and casts them to float32; we compute them in
float64 torch and cast the same way, so a regenerated table equals a stored one bit for bit.
Hand-written because timm's `build_sincos2d_pos_embed` lays the sine / cosine halves out
differently (checked: not the reference's table).
"""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] table: sines in the first half, cosines in the second."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """[(1 if cls_token) + H*W, embed_dim] float32 table; the class-token row is zeros.

    Half of the channels encode the row index, half the column index; patches are enumerated
    row-major, as `PatchEmbed` flattens them.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    # The reference's first half encodes the column (its meshgrid takes w first), the second the row.
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()
