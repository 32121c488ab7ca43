"""Inference-only JumpReLU SAE, so SAELens `jumprelu` folders (e.g. Gemma Scope) load here.

z_i = ReLU(a_i) * 1[a_i > theta_i], as SAELens' JumpReLUSAE.encode; there is no trainer for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, threshold_mask
from sae.config import SAEConfig
from sae.errors import SAEConfigError
from sae.sparse_code import Support


class JumpReLUSAE(SAE):
    """Per-feature thresholds loaded from disk; `select_train` is unavailable."""

    arch = "jumprelu"
    saelens_architecture = "jumprelu"
    trainable = False

    threshold: Tensor

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.register_buffer("threshold", torch.zeros(cfg.n_features))

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, float]]:
        raise SAEConfigError("jumprelu SAEs are inference-only here (loaded from SAELens); they cannot be trained.")

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        return threshold_mask(pre_acts, self.threshold)
