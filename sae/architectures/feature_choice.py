"""Feature-Choice SAE (Ayonrinde 2024), docs/ALGORITHMS.md §3: each latent picks its m_i best tokens.

S[b, i] = 1 iff A[b, i] is among the m_i largest of column i, with sum_i m_i = k*B (the TopK
budget). Capacities are uniform (m = k*B/F) or Zipf, m_i ~ (r_i + r0)^-s by *demand* rank r_i,
rounded by largest remainder; which of these is the paper's default is unconfirmed (our choice:
uniform). Demand is an EMA of how often a latent is among a token's top-k pre-activations (what
TopK would pick): a latent's own FC density is exactly the capacity it was given, so ranking by
density would freeze the first order forever (our choice, docs/ALGORITHMS.md §3). Inference: per-feature
JumpReLU thresholds, EMA of each column's smallest selected positive value during training,
calibrated on held-out rows afterwards (sae/calibration.py; our design, as for Mutual-Choice).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae.base import SAE, threshold_mask, threshold_start, update_threshold_ema
from sae.config import SAEConfig
from sae.errors import SAEConfigError
from sae.sparse_code import SparseCode, Support


class FeatureChoiceSAE(SAE):
    """Per-feature top-m_i selection; per-feature-threshold JumpReLU at inference."""

    arch = "feature_choice"
    saelens_architecture = "jumprelu"
    calibration_rule = "per_latent"
    default_aux_loss = "none"  # FC has no dead latents by construction; aux_zipf is optional (§3)

    threshold: Tensor
    threshold_initialized: Tensor
    density_ema: Tensor
    demand_ema: Tensor
    optional_state = ("demand_ema",)

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        F = cfg.n_features
        self.register_buffer("threshold", torch.full((F,), float("inf")))
        self.register_buffer("threshold_initialized", torch.zeros(F, dtype=torch.bool))
        self.register_buffer("density_ema", torch.zeros(F))
        self.register_buffer("demand_ema", torch.zeros(F))
        self._pending_demand: Tensor | None = None  # this step's demand, folded into the EMA by observe()
        self._by_rank: dict[tuple[int, torch.device], tuple[Tensor, int]] = {}  # capacities_by_rank, per B and device

    def capacity_shares(self) -> Tensor:
        """Fraction of the k*B budget for the latent at each demand rank (rank 1 first), float64."""
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
        by_rank, _ = self.capacities_by_rank(batch_size)
        return torch.empty_like(by_rank).scatter_(0, self.demand_order(), by_rank)

    def capacities_by_rank(self, batch_size: int) -> tuple[Tensor, int]:
        """(m at each demand rank [F] int64 on the SAE's device, its maximum). They depend on B only, so they are
        computed once per batch size: the checks, the rounding and the copy to the device would sync every step."""
        key = (batch_size, self.demand_ema.device)
        if key not in self._by_rank:
            assert self.cfg.k is not None
            self.check_batch_size(batch_size)
            total, F = self.cfg.k * batch_size, self.cfg.n_features
            if self.cfg.fc_capacity == "uniform":  # exact integers: k*B // F each, remainder to the top ranks
                by_rank = total // F + (torch.arange(F) < total % F).to(torch.int64)
            else:
                by_rank = largest_remainder(self.capacity_shares(), total, cap=batch_size)
            self._by_rank[key] = (by_rank.to(self.demand_ema.device), int(by_rank.max()))
        return self._by_rank[key]

    def demand_order(self) -> Tensor:
        """Latents from most to least demanded (rank 1 first); ties, as at step 0, keep index order."""
        return torch.sort(-self.demand_ema, stable=True).indices

    @torch.no_grad()
    def measure_demand(self, pre_acts: Tensor) -> Tensor:
        """Fraction of the (global) batch's tokens whose top-k positive pre-activations include each latent [F]."""
        assert self.cfg.k is not None
        top = pre_acts.topk(min(self.cfg.k, pre_acts.shape[1]), dim=1, sorted=False)
        wanted = (top.values > 0).flatten().to(self.demand_ema.dtype)  # counted by scatter-add: no sync
        counts = self.demand_ema.new_zeros(pre_acts.shape[1]).index_add_(0, top.indices.flatten(), wanted)
        coll = self.collectives
        return coll.sum_(counts) / (pre_acts.shape[0] * coll.world_size)

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, Tensor | float]]:
        n_rows, n_features = pre_acts.shape
        coll, k = self.collectives, self.cfg.k
        assert k is not None
        m = self.capacities(n_rows * coll.world_size)  # capacities of the global batch
        m_max = self.capacities_by_rank(n_rows * coll.world_size)[1]
        if self.cfg.fc_capacity == "zipf":  # re-ranked from the next step on (observe() folds it in)
            self._pending_demand = self.measure_demand(pre_acts)
        best = pre_acts.topk(min(m_max, n_rows), dim=0, sorted=True)  # [m_max, F], best first
        top = best.indices
        keep = torch.arange(top.shape[0], device=m.device).unsqueeze(1) < m.unsqueeze(0)
        if coll.world_size > 1:  # keep what beats the m_i-th value of column i over all ranks
            everyone = coll.cat(best.values).sort(dim=0, descending=True).values
            keep &= best.values >= everyone.gather(0, (m - 1).unsqueeze(0))
            ranks, cols = keep.nonzero(as_tuple=True)  # how many that is, the host learns (a sync)
        else:  # exactly sum(m) = k*B entries (each m_i <= B): a size known up front, so no host sync
            ranks, cols = torch.nonzero_static(keep, size=k * n_rows).unbind(1)
        support = Support.from_pairs(top[ranks, cols], cols, n_rows, n_features)
        positive = (pre_acts[support.rows, support.cols] > 0).to(torch.int64)
        per_token = torch.zeros(n_rows, dtype=torch.int64, device=positive.device).index_add_(0, support.rows, positive)
        covered = per_token > 0
        return support, {"zero_latent_token_frac": 1.0 - covered.float().mean().double()}  # read at log steps

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        if not bool(self.threshold_initialized.any()):
            raise SAEConfigError(
                "this Feature-Choice SAE has no inference thresholds yet: they are learned during "
                "training from threshold_start_step on; train longer or use encode_batch()."
            )
        return threshold_mask(pre_acts, self.threshold)

    @torch.no_grad()
    def observe(self, code: SparseCode, step: int, total_steps: int) -> None:
        beta, coll = self.cfg.density_ema_beta, self.collectives
        fired = coll.sum_(code.fired_count()).to(self.density_ema.dtype) / (code.support.n_rows * coll.world_size)
        self.density_ema.mul_(beta).add_(fired, alpha=1 - beta)
        if self._pending_demand is not None:
            self.demand_ema.mul_(beta).add_(self._pending_demand, alpha=1 - beta)
            self._pending_demand = None
        if step < threshold_start(self.cfg, total_steps):
            return
        positive = code.values > 0  # the others scatter +inf, which changes no minimum: no masked index, no sync
        observed = torch.full_like(self.threshold, float("inf")).scatter_reduce(
            0, code.support.cols, torch.where(positive, code.values, float("inf")).to(self.threshold.dtype), "amin"
        )
        coll.min_(observed)
        update_threshold_ema(
            self.threshold, self.threshold_initialized, observed, torch.isfinite(observed), self.cfg.threshold_beta
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
