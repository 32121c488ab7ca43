"""Feature-Choice SAE (Ayonrinde 2024), ALGORITHMS §3: each latent picks its m_i best tokens.

S[b, i] = 1 iff A[b, i] is among the m_i largest of column i, with sum_i m_i = k*B (the TopK
budget). Capacities are uniform (m = k*B/F) or Zipf, m_i ~ (r_i + r0)^-s by EMA-density rank r_i,
rounded by largest remainder; which of these is the paper's default is unconfirmed (our choice:
uniform). Inference: per-feature JumpReLU thresholds, EMA of each column's smallest selected
positive value (our design, same rule as Mutual-Choice).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae.base import SAE, Selection, threshold_mask, threshold_start, update_threshold_ema
from sae.config import SAEConfig
from sae.errors import SAEConfigError


class FeatureChoiceSAE(SAE):
    """Per-feature top-m_i selection; per-feature-threshold JumpReLU at inference."""

    arch = "feature_choice"
    saelens_architecture = "jumprelu"
    default_aux_loss = "none"  # FC has no dead latents by construction; aux_zipf is optional (§3)

    threshold: Tensor
    threshold_initialized: Tensor
    density_ema: Tensor

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        F = cfg.n_features
        self.register_buffer("threshold", torch.full((F,), float("inf")))
        self.register_buffer("threshold_initialized", torch.zeros(F, dtype=torch.bool))
        self.register_buffer("density_ema", torch.zeros(F))

    def capacity_shares(self) -> Tensor:
        """Fraction of the k*B budget for the latent at each density rank (rank 1 first), float64."""
        F = self.cfg.n_features
        if self.cfg.fc_capacity == "uniform":
            return torch.full((F,), 1.0 / F, dtype=torch.float64)
        ranks = torch.arange(1, F + 1, dtype=torch.float64)
        weights = (ranks + self.cfg.fc_zipf_r0) ** (-self.cfg.fc_zipf_s)
        return weights / weights.sum()

    def minimum_batch_size(self) -> int:
        """Smallest B giving every latent m_i >= 1: ceil(F/k) for uniform capacities."""
        assert self.cfg.k is not None
        if self.cfg.fc_capacity == "uniform":
            return -(-self.cfg.n_features // self.cfg.k)
        return math.ceil(1 / (float(self.capacity_shares().min()) * self.cfg.k) - 1e-9)

    def check_batch_size(self, batch_size: int) -> None:
        minimum = self.minimum_batch_size()
        if batch_size < minimum:
            raise SAEConfigError(
                f"Feature-Choice needs every latent to take at least one token per batch (m_i >= 1); "
                f"batch_size={batch_size} is too small: the minimum batch size for "
                f"n_features={self.cfg.n_features}, k={self.cfg.k}, fc_capacity={self.cfg.fc_capacity!r} "
                f"is {minimum}."
            )

    def capacities(self, batch_size: int) -> Tensor:
        """m_i per latent [F] (int64): shares * k*B, capped at B, largest-remainder rounded."""
        assert self.cfg.k is not None
        self.check_batch_size(batch_size)
        total, F = self.cfg.k * batch_size, self.cfg.n_features
        if self.cfg.fc_capacity == "uniform":  # exact integers: k*B // F each, remainder to the top ranks
            by_rank = total // F + (torch.arange(F) < total % F).to(torch.int64)
        else:
            by_rank = largest_remainder(self.capacity_shares(), total, cap=batch_size)
        order = torch.sort(-self.density_ema, stable=True).indices  # densest latent gets rank 1
        by_rank = by_rank.to(order.device)
        return torch.empty_like(by_rank).scatter_(0, order, by_rank)

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        m = self.capacities(pre_acts.shape[0])
        top = pre_acts.topk(int(m.max()), dim=0, sorted=True).indices  # [m_max, F], best first
        keep = torch.arange(top.shape[0], device=m.device).unsqueeze(1) < m.unsqueeze(0)
        mask = torch.zeros_like(pre_acts, dtype=torch.bool).scatter_(0, top, keep)
        zero_tokens = ((mask & (pre_acts > 0)).sum(dim=1) == 0).float().mean()
        return mask, {"zero_latent_token_frac": float(zero_tokens)}

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        if not bool(self.threshold_initialized.any()):
            raise SAEConfigError(
                "this Feature-Choice SAE has no inference thresholds yet: they are learned during "
                "training from threshold_start_step on; train longer or use encode_batch()."
            )
        return threshold_mask(pre_acts, self.threshold)

    @torch.no_grad()
    def observe(self, z: Tensor, selection: Selection, step: int, total_steps: int) -> None:
        beta = self.cfg.density_ema_beta
        self.density_ema.mul_(beta).add_((z > 0).float().mean(dim=0), alpha=1 - beta)
        if step < threshold_start(self.cfg, total_steps):
            return
        chosen = selection.mask & (z > 0)
        observed = torch.where(chosen, z, torch.full_like(z, float("inf"))).min(dim=0).values
        update_threshold_ema(
            self.threshold, self.threshold_initialized, observed, chosen.any(dim=0), self.cfg.threshold_beta
        )


def largest_remainder(shares: Tensor, total: int, cap: int) -> Tensor:
    """Integers proportional to `shares`, each <= cap, summing to `total` (Hamilton's method).

    Shares over the cap are clipped and the surplus is spread over the rest (water-filling)
    before rounding; ties in the remainders go to the earlier (denser) rank.
    """
    if total > cap * shares.numel():
        raise SAEConfigError(f"cannot place {total} selections in {shares.numel()} latents of capacity {cap}.")
    capped = torch.zeros_like(shares, dtype=torch.bool)
    while True:
        free_total = total - cap * int(capped.sum())
        real = torch.where(capped, torch.full_like(shares, float(cap)), shares * free_total / shares[~capped].sum())
        over = (real > cap) & ~capped
        if not over.any():
            break
        capped |= over
    floor = real.floor()
    missing = total - int(floor.sum())
    order = torch.sort(-(real - floor), stable=True).indices
    floor[order[:missing]] += 1
    return floor.to(torch.int64)
