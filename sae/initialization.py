"""Data-dependent initialisation (docs/ALGORITHMS.md §0): scalar normalisation c and b_pre.

b_pre starts at the geometric median of ~32k activations (OpenAI's sparse_autoencoder), computed
with Weiszfeld's algorithm; W_enc = W_dec^T is set when the SAE is constructed (sae/base.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """argmin_y sum_i ||x_i - y|| by Weiszfeld iterations in float64 (robust to outliers, unlike the mean)."""
    x = points.double()
    y = x.mean(dim=0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w.unsqueeze(1) * x).sum(dim=0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * (y.norm() + 1e-12):
            break
    return y.to(points.dtype)
