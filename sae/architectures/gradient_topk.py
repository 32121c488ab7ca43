"""Gradient SAE, g-SAE (Olmo et al. 2024), docs/ALGORITHMS.md §5: TopK on a gradient-augmented score.

h = W_dec g is each latent's attribution-patching weight (g: the LM loss gradient at the hook, in
the SAE's normalised space); the score s = z + beta * z * |h| picks k latents per token and the
plain values z are emitted (unconfirmed; our choice). h is divided by its per-token RMS by default
so beta is scale-free (our choice). Without gradients, inference is plain TopK (beta = 0).
"""

from __future__ import annotations

from torch import Tensor

from sae.base import SAE, topk_mask
from sae.sparse_code import Support, topk_support


class GradientTopKSAE(SAE):
    """Per-token TopK on s = z * (1 + beta * |W_dec g|)."""

    arch = "gradient_topk"
    saelens_architecture = "topk"
    needs_grads = True

    def scores(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        """s = z + beta * z * |h|, or z alone when no gradients are given."""
        z = pre_acts.relu()
        if grads is None:
            return z
        h = grads @ self.W_dec.detach().T
        if self.cfg.grad_rms_normalize:
            h = h / h.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        return z + self.cfg.grad_beta * z * h.abs()

    def select_train(self, pre_acts: Tensor, grads: Tensor | None) -> tuple[Support, dict[str, float]]:
        assert self.cfg.k is not None
        return topk_support(self.scores(pre_acts, grads), self.cfg.k), {}

    def select_inference(self, pre_acts: Tensor, grads: Tensor | None) -> Tensor:
        k = self.cfg.inference_k or self.cfg.k
        assert k is not None
        if grads is None:
            return topk_mask(pre_acts, k)
        return topk_mask(self.scores(pre_acts, grads), k)
