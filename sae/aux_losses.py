"""Auxiliary losses that revive dead and dying latents: AuxK (§1) and aux_zipf (§4).

Both are one function, `aux_reconstruction_loss`, with different latent weights: AuxK uses
w = 1[dead], aux_zipf uses w_i = clip(1 - p_i / p_hat(rank_i), 0, 1). So aux_zipf with
dead-only weights is AuxK exactly (ALGORITHMS §4.6).
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_FLOOR = 1e-6
"""Zipf weights below this count as 0, so latents sitting on the fitted curve are not candidates."""


def aux_reconstruction_loss(pre_acts: Tensor, residual: Tensor, W_dec: Tensor, weights: Tensor, k_aux: int) -> Tensor:
    """||e - e_hat||^2 / ||e - mean(e)||^2 with e_hat = W_dec z_aux (no bias), Gao et al. App. A.2.

    z_aux keeps, per token, the k_aux latents with w > 0 of largest w * ReLU(a) and emits the
    unweighted ReLU(a) there; k_aux is clamped to the number of candidates. Returns 0 when there
    are no candidates or the value is not finite. `residual` must already be detached.
    """
    candidates = weights > 0
    n_candidates = int(candidates.sum())
    if n_candidates == 0:
        return pre_acts.new_zeros(())
    k = min(k_aux, n_candidates)
    acts = pre_acts.relu()
    scores = torch.where(candidates, weights * acts, torch.full_like(acts, float("-inf")))
    idx = scores.topk(k, dim=-1, sorted=False).indices
    z_aux = torch.zeros_like(acts).scatter(-1, idx, acts.gather(-1, idx))
    e_hat = z_aux @ W_dec
    loss = (residual - e_hat).pow(2).sum() / (residual - residual.mean(dim=0)).pow(2).sum()
    if not torch.isfinite(loss):
        return pre_acts.new_zeros(())
    return loss


def auxk_loss(pre_acts: Tensor, residual: Tensor, W_dec: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK: dead latents reconstruct the residual of the live ones (Gao et al. 2024 §A.2)."""
    return aux_reconstruction_loss(pre_acts, residual, W_dec, dead.to(pre_acts.dtype), k_aux)


def aux_zipf_loss(pre_acts: Tensor, residual: Tensor, W_dec: Tensor, weights: Tensor, k_aux: int) -> Tensor:
    """aux_zipf (Ayonrinde 2024): AuxK over dead *and* under-used latents, weighted by `zipf_weights`."""
    return aux_reconstruction_loss(pre_acts, residual, W_dec, weights.to(pre_acts.dtype), k_aux)


@torch.no_grad()
def zipf_weights(density: Tensor, dead: Tensor, head_fraction: float = 0.8, r0: float = 0.0) -> Tensor:
    """w_i = clip(1 - p_i / p_hat(r_i), 0, 1), dead -> 1 (workbench formula, our choice, §4).

    p_hat is the least-squares fit of log p_r = c - s*log(r + r0) over the head of the density
    curve (1-based ranks <= head_fraction*F, p > 0). With fewer than two points to fit, the
    weights fall back to 1[dead], i.e. AuxK.
    """
    F = density.numel()
    p = density.double()
    order = torch.sort(-p, stable=True).indices
    rank = torch.empty(F, dtype=torch.float64).scatter_(0, order, torch.arange(1, F + 1, dtype=torch.float64))
    log_r = torch.log(rank + r0)
    head = (rank <= head_fraction * F) & (p > 0)
    if int(head.sum()) < 2:
        return dead.float()
    x, y = log_r[head], torch.log(p[head])
    x_c = x - x.mean()
    slope = (x_c * (y - y.mean())).sum() / x_c.pow(2).sum().clamp_min(1e-300)
    intercept = y.mean() - slope * x.mean()
    p_hat = torch.exp(intercept + slope * log_r)
    w = (1 - p / p_hat).clamp(0, 1)
    w = torch.where(w < WEIGHT_FLOOR, torch.zeros_like(w), w)
    return torch.where(dead, torch.ones_like(w), w).float()
