"""TopK SAE (Gao et al. 2024; Makhzani & Frey 2013): keep each token's k largest pre-activations.

Training and inference use the same rule, so L0 == k exactly (docs/ALGORITHMS.md §1); `inference_k`
allows Makhzani & Frey's alpha*k at test time.
"""

from __future__ import annotations

from torch import Tensor

from sae.base import SAE, topk_mask
from sae.sparse_code import Support, topk_support


class TopKSAE(SAE):
    """Per-token TopK selection."""

    arch = "topk"
    saelens_architecture = "topk"

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, float]]:
        assert self.cfg.k is not None
        return topk_support(pre_acts, self.cfg.k), {}

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        return topk_mask(pre_acts, self.cfg.inference_k or self.cfg.k)
