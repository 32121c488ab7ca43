"""Inference-only ReLU SAE ("standard" in SAELens), so SAELens `standard` folders (e.g. GPT-2 small's residual
SAEs, release gpt2-small-res-jb) load here.

z = ReLU(W_enc (x - b_dec) + b_enc), as SAELens' StandardSAE.encode; there is no trainer for it (the workbench
trains sparsity by selection, not by an L1 penalty).
"""

from __future__ import annotations

from torch import Tensor

from sae.base import SAE
from sae.errors import SAEConfigError
from sae.sparse_code import Support


class ReLUSAE(SAE):
    """Every positive pre-activation is active; `select_train` is unavailable."""

    arch = "relu"
    saelens_architecture = "standard"
    trainable = False

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, float]]:
        raise SAEConfigError("relu (SAELens standard) SAEs are inference-only here; they cannot be trained.")

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        return pre_acts > 0
