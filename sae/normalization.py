"""Input normalisation stored with an SAE and undone on its output (docs/ALGORITHMS.md §0).

`scalar` multiplies by one constant c = sqrt(d)/E||x|| estimated from data (SAELens
`expected_average_only_in`); `per_token_standardize` is OpenAI's/BatchTopK's per-row
standardisation, written exactly as SAELens' `layer_norm` (unbiased std, eps 1e-5) so the
exported SAE behaves identically there.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

PER_TOKEN_EPS = 1e-5


@dataclass
class TokenStats:
    """Per-token mean and std removed by `per_token_standardize`; None for the other modes."""

    mean: Tensor | None = None
    std: Tensor | None = None


def normalize(x: Tensor, mode: str, scale: Tensor) -> tuple[Tensor, TokenStats]:
    """Map raw activations [N, d] into the space the SAE works in."""
    if mode == "scalar":
        return x * scale, TokenStats()
    if mode == "per_token_standardize":
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + PER_TOKEN_EPS), TokenStats(mean, std)
    return x, TokenStats()


def denormalize(y: Tensor, mode: str, scale: Tensor, stats: TokenStats) -> Tensor:
    """Undo `normalize` on a reconstruction, so outputs can be spliced into the model."""
    if mode == "scalar":
        return y / scale
    if mode == "per_token_standardize":
        if stats.mean is None or stats.std is None:
            raise ValueError("per_token_standardize needs the per-token stats of the encoded inputs.")
        return y * stats.std + stats.mean
    return y


def normalize_grads(g: Tensor, mode: str, scale: Tensor, stats: TokenStats) -> Tensor:
    """Gradient of the LM loss w.r.t. the *normalised* input, by the chain rule (g-SAE, §5).

    With x_n = c*x the reconstruction enters the model as x_n/c, so dL/dx_n = g/c; with
    x = x_n*std + mean (stats held fixed, as when splicing), dL/dx_n = g*std.
    """
    if mode == "scalar":
        return g / scale
    if mode == "per_token_standardize":
        assert stats.std is not None
        return g * stats.std
    return g


def estimate_scale(norm_sum: float, n_rows: int, d_in: int) -> float:
    """c = sqrt(d) / E||x||, so normalised inputs have mean norm sqrt(d) (SAELens, Anthropic Apr 2024)."""
    mean_norm = norm_sum / max(n_rows, 1)
    if mean_norm <= 0:
        return 1.0
    return float(d_in**0.5 / mean_norm)
