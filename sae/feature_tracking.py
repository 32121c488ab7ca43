"""Per-latent firing statistics kept during training: dead-latent counters and EMA densities.

A latent is dead once it has not fired (z > fire_threshold) for `dead_tokens` tokens
(OpenAI's `tokens_since_fired`, docs/ALGORITHMS.md §0); the EMA density feeds aux_zipf (§4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.distributed import SINGLE_PROCESS, Collectives
from sae.sparse_code import SparseCode


class FeatureTracker:
    """Counts tokens since each latent last fired and keeps an EMA of firing rates."""

    def __init__(
        self, n_features: int, dead_tokens: int, fire_threshold: float, ema_beta: float,
        collectives: Collectives = SINGLE_PROCESS,
    ) -> None:
        self.collectives = collectives
        "Data-parallel ranks: firing counts are summed over the global batch."
        self.dead_tokens = dead_tokens
        self.fire_threshold = fire_threshold
        self.ema_beta = ema_beta
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.int64)
        self.density_ema = torch.zeros(n_features)

    @torch.no_grad()
    def update(self, code: SparseCode) -> None:
        """Count one batch of (detached) latents; only the support can fire."""
        fired = self.collectives.sum_(code.fired_count(self.fire_threshold))
        n_tokens = code.support.n_rows * self.collectives.world_size
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired > 0] = 0
        rate = fired.to(self.density_ema.dtype) / n_tokens
        self.density_ema.mul_(self.ema_beta).add_(rate, alpha=1 - self.ema_beta)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_tensors(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired, "density_ema": self.density_ema}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.density_ema = tensors["density_ema"].clone()
