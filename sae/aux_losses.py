"""Auxiliary losses that revive dead and dying latents: AuxK (§1) and aux_zipf (§4).

Both are one function, `aux_reconstruction_loss`, with different latent weights: AuxK uses
w = 1[dead], aux_zipf uses w_i = clip(1 - p_i / p_hat(rank_i), 0, 1). So aux_zipf with
dead-only weights is AuxK exactly (ALGORITHMS §4.6). `sparse_aux_loss` is the same loss for the
sparse training path: it decodes only the chosen k_aux latents per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.distributed import SINGLE_PROCESS, Collectives, centred_sum_of_squares
from sae.sparse_code import SparseCode, Support, decode_sparse, gather_pre_acts

WEIGHT_FLOOR = 1e-6
"""Zipf weights below this count as 0, so latents sitting on the fitted curve are not candidates."""


def aux_reconstruction_loss(
    pre_acts: Tensor, residual: Tensor, W_dec: Tensor, weights: Tensor, k_aux: int,
    coll: Collectives = SINGLE_PROCESS,
) -> Tensor:
    """||e - e_hat||^2 / ||e - mean(e)||^2 with e_hat = W_dec z_aux (no bias), Gao et al. App. A.2.

    z_aux keeps, per token, the k_aux latents with w > 0 of largest w * ReLU(a) and emits the
    unweighted ReLU(a) there; k_aux is clamped to the number of candidates. Returns 0 when there
    are no candidates or the value is not finite. `residual` must already be detached. This is the
    dense reference; `sparse_aux_loss` is the same loss on the training path's sparse kernels.
    """
    support = aux_support(pre_acts.detach(), weights, k_aux)
    if support is None:
        return pre_acts.new_zeros(())
    z_aux = support.to_dense(pre_acts[support.rows, support.cols].relu())
    e_hat = z_aux @ W_dec
    return _normalized_error(residual, e_hat, coll)


def aux_support(pre_acts: Tensor, weights: Tensor, k_aux: int) -> Support | None:
    """Per token, the k_aux candidate latents (w > 0) of largest w * ReLU(a); None without candidates.

    Only the candidates' columns are scored, so with few dead latents this is cheap.
    """
    candidates = (weights > 0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return None
    k = min(k_aux, int(candidates.numel()))
    w = weights[candidates].to(pre_acts.dtype)
    if candidates.numel() == weights.numel() and bool((w == 1).all()):
        scores = pre_acts.relu()  # every latent is dead: no column gather needed
    else:
        scores = pre_acts[:, candidates].relu_().mul_(w)
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return Support.from_topk(candidates[idx], pre_acts.shape[1])


def sparse_aux_loss(
    sae_input: Tensor, W_enc: Tensor, b_enc: Tensor, pre_acts: Tensor, residual: Tensor, W_dec: Tensor,
    weights: Tensor, k_aux: int, coll: Collectives = SINGLE_PROCESS,
) -> Tensor:
    """`aux_reconstruction_loss` computed on the k_aux chosen latents only (same value and gradients).

    sae_input, W_enc, b_enc: what `pre_acts` (no gradient) was computed from, for the sparse backward.
    """
    support = aux_support(pre_acts, weights, k_aux)
    if support is None:
        return residual.new_zeros(())
    values = gather_pre_acts(sae_input, W_enc, b_enc, pre_acts, support).relu()
    return _normalized_error(residual, decode_sparse(SparseCode(support, values), W_dec), coll)


def _normalized_error(residual: Tensor, e_hat: Tensor, coll: Collectives) -> Tensor:
    """NMSE of the aux reconstruction over the global batch; 0 when not finite (e.g. a constant residual)."""
    loss = (residual - e_hat).pow(2).sum() / centred_sum_of_squares(residual, coll)
    if not torch.isfinite(loss):
        return residual.new_zeros(())
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
