"""Per-latent firing statistics kept during training: dead-latent counters and EMA densities.

A latent is dead once it has not fired (z > fire_threshold) for `dead_tokens` tokens
(OpenAI's `tokens_since_fired`, ALGORITHMS §0); the EMA density feeds aux_zipf (§4).
"""

from __future__ import annotations

import torch
from torch import Tensor


class FeatureTracker:
    """Counts tokens since each latent last fired and keeps an EMA of firing rates."""

    def __init__(self, n_features: int, dead_tokens: int, fire_threshold: float, ema_beta: float) -> None:
        self.dead_tokens = dead_tokens
        self.fire_threshold = fire_threshold
        self.ema_beta = ema_beta
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.int64)
        self.density_ema = torch.zeros(n_features)

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        fires = z > self.fire_threshold
        self.tokens_since_fired += z.shape[0]
        self.tokens_since_fired[fires.any(dim=0)] = 0
        self.density_ema.mul_(self.ema_beta).add_(fires.float().mean(dim=0), alpha=1 - self.ema_beta)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_tensors(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired, "density_ema": self.density_ema}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.density_ema = tensors["density_ema"].clone()
