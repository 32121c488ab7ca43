"""Mutual-Choice SAE (Ayonrinde 2024) = BatchTopK (Bussmann et al. 2024), ALGORITHMS §2.

Training keeps the top k*B entries of ReLU(A) over the whole batch, so the batch-mean L0 is k.
Inference cannot see the batch, so it is a JumpReLU with one learned threshold theta, the EMA of
the smallest selected positive value (dictionary_learning's rule, beta = 0.999).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, Selection, threshold_mask, threshold_start, update_threshold_ema
from sae.config import SAEConfig
from sae.errors import SAEConfigError


class MutualChoiceSAE(SAE):
    """Batch-global top-(k*B) selection; single-threshold JumpReLU at inference."""

    arch = "mutual_choice"
    saelens_architecture = "jumprelu"

    threshold: Tensor
    threshold_initialized: Tensor

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.register_buffer("threshold", torch.full((1,), float("inf")))
        self.register_buffer("threshold_initialized", torch.zeros(1, dtype=torch.bool))

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        assert self.cfg.k is not None
        flat = pre_acts.relu().flatten()
        idx = flat.topk(self.cfg.k * pre_acts.shape[0], sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).view_as(pre_acts)
        return mask, {"threshold": float(self.threshold)}

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        if not bool(self.threshold_initialized.all()):
            raise SAEConfigError(
                "this Mutual-Choice SAE has no inference threshold yet: it is learned during training "
                "from threshold_start_step on; train longer or use encode_batch()."
            )
        return threshold_mask(pre_acts, self.threshold)

    @torch.no_grad()
    def observe(self, z: Tensor, selection: Selection, step: int, total_steps: int) -> None:
        if step < threshold_start(self.cfg, total_steps):
            return
        positive = z[selection.mask & (z > 0)]
        if positive.numel() == 0:
            return
        observed = positive.min().reshape(1).to(self.threshold.dtype)
        valid = torch.ones(1, dtype=torch.bool)
        update_threshold_ema(
            self.threshold, self.threshold_initialized, observed, valid, self.cfg.threshold_beta
        )
