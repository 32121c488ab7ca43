"""The learning rate: its default scaling with width and the per-step schedule (docs/ALGORITHMS.md §0)."""

from __future__ import annotations

import math

from sae.config import TrainConfig


def default_lr(n_features: int) -> float:
    """2e-4 / sqrt(F / 2^14), the dictionary_learning scaling of the learning rate with width."""
    return 2e-4 / math.sqrt(n_features / 2**14)


def lr_at(step: int, total_steps: int, base_lr: float, cfg: TrainConfig) -> float:
    """Linear warmup (<= warmup_max_fraction of the run), flat, then linear decay to 0 (our choice)."""
    warmup = min(cfg.warmup_steps, int(cfg.warmup_max_fraction * total_steps))
    decay_start = total_steps - int(cfg.decay_fraction * total_steps)
    factor = 1.0
    if step < warmup:
        factor = (step + 1) / warmup
    if step >= decay_start:
        factor = min(factor, (total_steps - step) / (total_steps - decay_start))
    return base_lr * factor
