"""Mutual-Choice SAE (Ayonrinde 2024) = BatchTopK (Bussmann et al. 2024), docs/ALGORITHMS.md §2.

Training keeps the top k*B entries of ReLU(A) over the whole batch, so the batch-mean L0 is k.
Inference cannot see the batch, so it is a JumpReLU with one learned threshold theta, the EMA of
the smallest selected positive value (dictionary_learning's rule, beta = 0.999) during training,
calibrated at the end so the mean inference L0 is k (sae/calibration.py; our design).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, threshold_mask, threshold_start, update_threshold_ema
from sae.config import SAEConfig
from sae.distributed import global_kth_largest
from sae.errors import SAEConfigError
from sae.sparse_code import SparseCode, Support, top_entries


class MutualChoiceSAE(SAE):
    """Batch-global top-(k*B) selection; single-threshold JumpReLU at inference."""

    arch = "mutual_choice"
    saelens_architecture = "jumprelu"
    calibration_rule = "global"

    threshold: Tensor
    threshold_initialized: Tensor

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.register_buffer("threshold", torch.full((1,), float("inf")))
        self.register_buffer("threshold_initialized", torch.zeros(1, dtype=torch.bool))

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, Tensor | float]]:
        assert self.cfg.k is not None
        n_rows, n_features = pre_acts.shape
        coll = self.collectives
        # Top k*B of a rather than of ReLU(a): the same set whenever k*B entries are positive, and
        # otherwise the extra entries emit ReLU(a) = 0 either way; it saves a dense [B, F] temporary.
        if coll.world_size == 1:
            flat = top_entries(pre_acts, self.cfg.k * n_rows)
        else:  # the global batch's k*B-th value decides; each rank keeps its entries above it
            kth = global_kth_largest(pre_acts, self.cfg.k * n_rows * coll.world_size, coll)
            flat = (pre_acts >= kth).flatten().nonzero().squeeze(1)
        support = Support(flat // n_features, flat % n_features, n_rows, n_features)
        return support, {"threshold": self.threshold[0].clone()}  # read at log steps: no sync here

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        if not bool(self.threshold_initialized.all()):
            raise SAEConfigError(
                "this Mutual-Choice SAE has no inference threshold yet: it is learned during training "
                "from threshold_start_step on; train longer or use encode_batch()."
            )
        return threshold_mask(pre_acts, self.threshold)

    @torch.no_grad()
    def observe(self, code: SparseCode, step: int, total_steps: int) -> None:
        if step < threshold_start(self.cfg, total_steps):
            return
        # The smallest positive value, +inf if none; an invalid (inf) observation leaves theta as it is. No host sync.
        observed = code.values.new_full((1,), float("inf"))
        if code.values.numel():
            observed = torch.where(code.values > 0, code.values, float("inf")).min().reshape(1)
        observed = self.collectives.min_(observed.to(self.threshold.dtype))
        valid = torch.isfinite(observed)
        update_threshold_ema(
            self.threshold, self.threshold_initialized, observed, valid, self.cfg.threshold_beta
        )
