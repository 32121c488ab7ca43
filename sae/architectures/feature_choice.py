"""Feature-Choice SAE (Ayonrinde 2024), docs/ALGORITHMS.md §3: each latent picks its m_i best tokens.

S[b, i] = 1 iff A[b, i] is among the m_i largest of column i, with sum_i m_i = k*B (the TopK
budget). Capacities are uniform (m = k*B/F) or Zipf, m_i ~ (r_i + r0)^-s by *demand* rank r_i, between one
token and B (our floor), rounded by largest remainder; which of these is the paper's default is unconfirmed (our
choice: Zipf, which fit better at every k of the README's long comparison). Demand is an EMA of how often a latent
is among a token's top-k pre-activations (what TopK would pick): a latent's own FC density is exactly the capacity
it was given, so ranking by density would freeze the first order forever (our choice, docs/ALGORITHMS.md §3).
Inference: per-feature JumpReLU thresholds, EMA of each column's smallest selected positive value during training,
calibrated on held-out rows afterwards (sae/calibration.py; our design, as for Mutual-Choice).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae.base import SAE, threshold_mask, threshold_start, update_threshold_ema
from sae.config import SAEConfig
from sae.errors import SAEConfigError
from sae.sparse_code import SparseCode, Support, column_topk, topk_indices


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
        self._runs: dict[int, list[tuple[int, int, int, int]]] = {}  # rank_runs of the capacities, per B

    def capacity_shares(self) -> Tensor:
        """Fraction of the k*B budget for the latent at each demand rank (rank 1 first), float64."""
        F = self.cfg.n_features
        if self.cfg.fc_capacity == "uniform":
            return torch.full((F,), 1.0 / F, dtype=torch.float64)
        ranks = torch.arange(1, F + 1, dtype=torch.float64)
        weights = (ranks + self.cfg.fc_zipf_r0) ** (-self.cfg.fc_zipf_s)
        return weights / weights.sum()

    def minimum_batch_size(self) -> int:
        """Smallest B giving every latent m_i >= 1, ceil(F/k), for both capacity rules: Zipf capacities are floored
        at one token per batch, so their tail never needs a larger batch (§3)."""
        assert self.cfg.k is not None
        return -(-self.cfg.n_features // self.cfg.k)

    def check_batch_size(self, batch_size: int) -> None:
        minimum = self.minimum_batch_size()
        if batch_size < minimum:
            raise SAEConfigError(
                f"Feature-Choice needs every latent to take at least one token per batch (m_i >= 1); "
                f"batch_size={batch_size} is too small: the minimum batch size for "
                f"n_features={self.cfg.n_features}, k={self.cfg.k} is {minimum} (F/k, rounded up)."
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
                # Zipf's tail would get less than one token per batch below B = F*H_F/k (5,265 at F=16384, k=32):
                # floored at one (our choice), the law holds above the floor and every latent keeps a column
                by_rank = largest_remainder(self.capacity_shares(), total, cap=batch_size, floor=1)
            self._by_rank[key] = (by_rank.to(self.demand_ema.device), int(by_rank.max()))
            self._runs[batch_size] = rank_runs(by_rank.tolist())
        return self._by_rank[key]

    def demand_order(self) -> Tensor:
        """Latents from most to least demanded (rank 1 first); ties, as at step 0, keep index order."""
        return torch.sort(-self.demand_ema, stable=True).indices

    @torch.no_grad()
    def measure_demand(self, pre_acts: Tensor) -> Tensor:
        """Fraction of the (global) batch's tokens whose top-k positive pre-activations include each latent [F]."""
        assert self.cfg.k is not None
        top = topk_indices(pre_acts, min(self.cfg.k, pre_acts.shape[1]))  # TopK's own (chunked) selection
        wanted = (pre_acts.gather(1, top) > 0).flatten().to(self.demand_ema.dtype)  # counted by scatter-add: no sync
        counts = self.demand_ema.new_zeros(pre_acts.shape[1]).index_add_(0, top.flatten(), wanted)
        coll = self.collectives
        return coll.sum_(counts) / (pre_acts.shape[0] * coll.world_size)

    def rank_runs(self, batch_size: int) -> list[tuple[int, int, int, int]]:
        """The runs of demand ranks select_train selects together at this batch size (`rank_runs` below)."""
        self.capacities_by_rank(batch_size)
        return self._runs[batch_size]

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, Tensor | float]]:
        n_rows = pre_acts.shape[0]
        if self.cfg.fc_capacity == "zipf":  # re-ranked from the next step on (observe() folds it in)
            self._pending_demand = self.measure_demand(pre_acts)
        if self.collectives.world_size > 1:
            support = self._select_across_ranks(pre_acts)
        else:
            support = self._select_by_runs(pre_acts)
        positive = (pre_acts[support.rows, support.cols] > 0).to(torch.int64)
        per_token = torch.zeros(n_rows, dtype=torch.int64, device=positive.device).index_add_(0, support.rows, positive)
        covered = per_token > 0
        return support, {"zero_latent_token_frac": 1.0 - covered.float().mean().double()}  # read at log steps

    def _select_by_runs(self, pre_acts: Tensor) -> Support:
        """One process: each run of demand ranks (`rank_runs`) takes its columns' top-m lists, m its largest
        capacity, and keeps the first m_i of column i: exactly sum(m) = k*B entries (each m_i <= B), sizes known
        up front, so no host sync."""
        n_rows, n_features = pre_acts.shape
        by_rank = self.capacities_by_rank(n_rows)[0]
        order = self.demand_order()
        rows, cols = [], []
        for r0, r1, m_run, total in self.rank_runs(n_rows):
            m_run = min(m_run, n_rows)
            members = order[r0:r1]
            if 2 * (r1 - r0) > n_features:  # most columns: select on the whole matrix rather than copy them out
                m = torch.zeros(n_features, dtype=by_rank.dtype, device=by_rank.device)
                m.scatter_(0, members, by_rank[r0:r1])
                _, top = column_topk(pre_acts, m_run)
                latent_of = None
            else:
                m = by_rank[r0:r1]
                _, top = column_topk(pre_acts.index_select(1, members), m_run)
                latent_of = members
            keep = torch.arange(m_run, device=m.device).unsqueeze(1) < m.unsqueeze(0)
            ranks, j = torch.nonzero_static(keep, size=total).unbind(1)
            rows.append(top[ranks, j])
            cols.append(j if latent_of is None else latent_of[j])
        return Support.from_pairs(torch.cat(rows), torch.cat(cols), n_rows, n_features)

    def _select_across_ranks(self, pre_acts: Tensor) -> Support:
        """Data parallel: keep what beats the m_i-th value of column i over all ranks' rows (capacities of the
        global batch); how many entries that is, the host learns (a sync)."""
        n_rows, n_features = pre_acts.shape
        coll = self.collectives
        m = self.capacities(n_rows * coll.world_size)
        m_max = self.capacities_by_rank(n_rows * coll.world_size)[1]
        best_values, top = column_topk(pre_acts, min(m_max, n_rows))  # [m_max, F], best first
        keep = torch.arange(top.shape[0], device=m.device).unsqueeze(1) < m.unsqueeze(0)
        everyone = coll.cat(best_values).sort(dim=0, descending=True).values
        keep &= best_values >= everyone.gather(0, (m - 1).unsqueeze(0))
        ranks, cols = keep.nonzero(as_tuple=True)
        return Support.from_pairs(top[ranks, cols], cols, n_rows, n_features)

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


def rank_runs(by_rank: list[int]) -> list[tuple[int, int, int, int]]:
    """(first rank, end rank, largest m, sum of m) of the runs of demand ranks whose top-m lists FC takes together.
    The tail of ranks whose capacities are at most the mean capacity's ceiling is one run (all of them under uniform
    capacities); above it a run holds the ranks whose capacities share a power-of-two bound (taken on their suffix
    maximum, so that runs are contiguous). Under Zipf capacities the few latents with m_i near B then no longer make
    every column sort its whole batch (at F=9216, k=32, B=4096 that sort took 1.7 s of a 2.2 s step), and the many
    latents with small m_i take short lists."""
    suffix_max, best = [0] * len(by_rank), 0
    for rank in range(len(by_rank) - 1, -1, -1):
        best = max(best, by_rank[rank])
        suffix_max[rank] = best
    tail = -(-sum(by_rank) // len(by_rank))
    runs: list[list[int]] = []
    for rank, bound in enumerate(suffix_max):
        group = 0 if bound <= tail else math.ceil(math.log2(bound))
        if runs and runs[-1][2] == group:
            runs[-1][1] = rank + 1
        else:
            runs.append([rank, rank + 1, group])
    return [(r0, r1, max(by_rank[r0:r1]), sum(by_rank[r0:r1])) for r0, r1, _ in runs]


def largest_remainder(shares: Tensor, total: int, cap: int, floor: int = 0) -> Tensor:
    """Integers proportional to `shares`, each in [floor, cap], summing to `total` (Hamilton's method).

    Shares over the cap are clipped and the surplus is spread over the rest (water-filling) before rounding; ties in
    the remainders go to the earlier (denser) rank. Where that leaves some below `floor`, the real-valued amounts
    become clip(lam * shares, floor, cap) with lam solved so that they sum to `total` (`_clipped_amounts`); where
    no amount is below the floor, the result is exactly that of the cap alone.
    """
    n = shares.numel()
    if total > cap * n or total < floor * n:
        raise SAEConfigError(f"cannot place {total} selections in {n} latents of at least {floor} and at most {cap}.")
    capped = torch.zeros_like(shares, dtype=torch.bool)
    while True:
        free_total = total - cap * int(capped.sum())
        real = torch.where(capped, torch.full_like(shares, float(cap)), shares * free_total / shares[~capped].sum())
        over = (real > cap) & ~capped
        if not over.any():
            break
        capped |= over
    if bool((real < floor).any()):
        real = _clipped_amounts(shares, total, floor, cap)
    whole = real.floor()
    missing = total - int(whole.sum())
    order = torch.sort(-(real - whole), stable=True).indices
    whole[order[:missing]] += 1
    return whole.to(torch.int64)


def _clipped_amounts(shares: Tensor, total: int, floor: int, cap: int) -> Tensor:
    """clip(lam * shares, floor, cap) summing to `total` (float64): the sum grows with lam, so bisection finds
    which latents sit at the floor, at the cap or between, and lam then follows exactly from those sets."""
    shares = shares.double()
    low, high = 0.0, float(cap) / float(shares[shares > 0].min())  # at `high` every latent is at the cap
    for _ in range(200):
        lam = (low + high) / 2
        if float((lam * shares).clamp(floor, cap).sum()) < total:
            low = lam
        else:
            high = lam
    at_floor, at_cap = high * shares <= floor, high * shares >= cap
    between = ~at_floor & ~at_cap
    rest = total - floor * int(at_floor.sum()) - cap * int(at_cap.sum())
    lam = rest / float(shares[between].sum()) if bool(between.any()) else high
    return (lam * shares).clamp(floor, cap)
