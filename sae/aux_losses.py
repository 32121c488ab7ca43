"""Auxiliary losses that revive dead and dying latents: AuxK (§1) and aux_zipf (§4).

Both are one function, `aux_reconstruction_loss`, with different latent weights: AuxK uses
w = 1[dead], aux_zipf uses w_i = 1 - p_i / p_hat(rank_i) on clearly under-used latents only
(p_i <= under_use * p_hat, our choice) and 1 on dead ones. So aux_zipf with dead-only weights is
AuxK exactly (docs/ALGORITHMS.md §4.6). Shared rules (our choice, §1 and §4): a token's own selected
latents are never its aux candidates (they already reconstruct), and the term is scaled by
min(#candidates / k_aux, 1), SAELens' AuxK scaling, so a handful of candidates is not asked to
explain the whole residual. `sparse_aux_loss` is the same loss for the sparse training path: it
decodes only the chosen k_aux latents per token.
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
    coll: Collectives = SINGLE_PROCESS, exclude: Support | None = None,
) -> Tensor:
    """min(C/k_aux, 1) * ||e - e_hat||^2 / ||e - mean(e)||^2, e_hat = W_dec z_aux (no bias), Gao et al. App. A.2.

    z_aux keeps, per token, the k_aux latents with w > 0 of largest w * ReLU(a), leaving out the
    token's own selected latents (`exclude`, the main code's support), and emits the unweighted
    ReLU(a) there; k_aux is clamped to the C candidates. Returns 0 when there are no candidates or
    the value is not finite. `residual` must already be detached. This is the dense reference;
    `sparse_aux_loss` is the same loss on the training path's sparse kernels.
    """
    support = aux_support(pre_acts.detach(), weights, k_aux, exclude)
    if support is None:
        return pre_acts.new_zeros(())
    z_aux = support.to_dense(pre_acts[support.rows, support.cols].relu())
    e_hat = z_aux @ W_dec
    return candidate_scale(weights, k_aux) * _normalized_error(residual, e_hat, coll)


def candidate_scale(weights: Tensor, k_aux: int) -> float:
    """min(#candidates / k_aux, 1): SAELens' AuxK scaling, for AuxK and aux_zipf alike (our choice)."""
    return min(int((weights > 0).sum()) / k_aux, 1.0)


def aux_support(pre_acts: Tensor, weights: Tensor, k_aux: int, exclude: Support | None = None) -> Support | None:
    """Per token, the k_aux candidate latents (w > 0) of largest w * ReLU(a); None without candidates.

    Entries of `exclude` (the token's own selected latents) are never chosen, so a token with fewer
    than k_aux other candidates gets fewer aux latents. Only the candidates' columns are scored, so
    with few dead latents this is cheap.
    """
    candidates = (weights > 0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return None
    n_rows, n_features = pre_acts.shape
    k = min(k_aux, int(candidates.numel()))
    w = weights[candidates].to(pre_acts.dtype)
    if candidates.numel() == n_features and bool((w == 1).all()):
        scores = pre_acts.relu()  # every latent is dead: no column gather needed
    else:
        scores = pre_acts[:, candidates].relu_().mul_(w)
    if exclude is not None and exclude.nnz:
        position = torch.full((n_features,), -1, dtype=torch.int64, device=candidates.device)
        position[candidates] = torch.arange(candidates.numel(), device=candidates.device)
        at = position[exclude.cols]
        hit = at >= 0
        scores[exclude.rows[hit], at[hit]] = -1.0  # below every ReLU score: never among the chosen
    top = scores.topk(k, dim=-1, sorted=False)
    chosen = top.values >= 0
    if bool(chosen.all()):
        return Support.from_topk(candidates[top.indices], n_features)
    rows = torch.arange(n_rows, device=pre_acts.device).unsqueeze(1).expand_as(top.indices)
    return Support.from_pairs(rows[chosen], candidates[top.indices[chosen]], n_rows, n_features)


def sparse_aux_loss(
    sae_input: Tensor, W_enc: Tensor, b_enc: Tensor, pre_acts: Tensor, residual: Tensor, W_dec: Tensor,
    weights: Tensor, k_aux: int, coll: Collectives = SINGLE_PROCESS, exclude: Support | None = None,
    b_pre: Tensor | None = None,
) -> Tensor:
    """`aux_reconstruction_loss` computed on the k_aux chosen latents only (same value and gradients).

    sae_input, W_enc, b_enc: what `pre_acts` (no gradient) was computed from, for the sparse backward; b_pre: the
    decoder bias when sae_input = x - b_pre carries no autograd history (see gather_pre_acts).
    """
    support = aux_support(pre_acts, weights, k_aux, exclude)
    if support is None:
        return residual.new_zeros(())
    values = gather_pre_acts(sae_input, W_enc, b_enc, pre_acts, support, b_pre).relu()
    error = _normalized_error(residual, decode_sparse(SparseCode(support, values), W_dec), coll)
    return candidate_scale(weights, k_aux) * error


def _normalized_error(residual: Tensor, e_hat: Tensor, coll: Collectives) -> Tensor:
    """NMSE of the aux reconstruction over the global batch; 0 when not finite (e.g. a constant residual)."""
    loss = (residual - e_hat).pow(2).sum() / centred_sum_of_squares(residual, coll)
    if not torch.isfinite(loss):
        return residual.new_zeros(())
    return loss


def auxk_loss(
    pre_acts: Tensor, residual: Tensor, W_dec: Tensor, dead: Tensor, k_aux: int, exclude: Support | None = None
) -> Tensor:
    """AuxK: dead latents reconstruct the residual of the live ones (Gao et al. 2024 §A.2)."""
    return aux_reconstruction_loss(pre_acts, residual, W_dec, dead.to(pre_acts.dtype), k_aux, exclude=exclude)


def aux_zipf_loss(
    pre_acts: Tensor, residual: Tensor, W_dec: Tensor, weights: Tensor, k_aux: int, exclude: Support | None = None
) -> Tensor:
    """aux_zipf (Ayonrinde 2024): AuxK over dead *and* under-used latents, weighted by `zipf_weights`."""
    return aux_reconstruction_loss(pre_acts, residual, W_dec, weights.to(pre_acts.dtype), k_aux, exclude=exclude)


@torch.no_grad()
def zipf_weights(
    density: Tensor, dead: Tensor, head_fraction: float = 0.8, r0: float = 0.0, under_use: float = 0.5
) -> Tensor:
    """w_i = 1 - p_i / p_hat(r_i) where p_i <= under_use * p_hat(r_i), else 0; dead -> 1 (our choice, §4).

    p_hat is the least-squares fit of log p_r = c - s*log(r + r0) over the head of the density
    curve (1-based ranks <= head_fraction*F, p > 0). A least-squares line leaves about half of the
    latents below it, so only latents well below it (by the factor under_use) are candidates.
    With fewer than two points to fit, the weights fall back to 1[dead], i.e. AuxK.
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
    w = torch.where(w < max(1 - under_use, WEIGHT_FLOOR), torch.zeros_like(w), w)
    return torch.where(dead, torch.ones_like(w), w).float()
