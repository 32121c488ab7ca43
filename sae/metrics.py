"""Evaluation metrics (docs/ALGORITHMS.md §7), computed in the original activation space.

Pure functions on tensors, plus `MetricsAccumulator`, which streams over batches in float64 so
dataset-level numbers (FVU with the dataset mean, densities) are exact however the data is split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from sae.base import SAE
from sae.batch_items import Batch, split_item
from sae.devices import to_device
from sae.errors import SAEConfigError, SAEDataError

DENSITY_HIST_EDGES = tuple(float(e) for e in torch.linspace(-8, 0, 33))
"""log10-density bin edges for `density_histogram` (1e-8 .. 1, 4 bins per decade)."""


def l0(z: Tensor) -> Tensor:
    """Active latents per token (z > 0)."""
    return (z > 0).sum(dim=-1)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained = Gao's NMSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(dim=0)).pow(2).sum())


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - FVU with the dataset mean (SAELens 6.54's explained_variance is the same; its _legacy is per-dimension)."""
    return 1.0 - fvu(x, x_hat)


def nmse0(x: Tensor, x_hat: Tensor) -> float:
    """NMSE against zero, sum ||x - x_hat||^2 / sum ||x||^2 (OpenAI README example); not FVU."""
    return float((x.double() - x_hat.double()).pow(2).sum() / x.double().pow(2).sum())


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of cos(x, x_hat)."""
    return float(_token_cosines(x.double(), x_hat.double()).mean())


def l2_ratio(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of ||x_hat|| / ||x|| (shrinkage shows as < 1)."""
    return float((x_hat.double().norm(dim=-1) / x.double().norm(dim=-1).clamp_min(1e-30)).mean())


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """E||x_hat||^2 / E[x . x_hat] (Rajamanoharan et al. 2024, Gated SAEs eq. 10); 1 = unbiased."""
    x64, h64 = x.double(), x_hat.double()
    return float(h64.pow(2).sum() / (x64 * h64).sum())


def feature_density(z: Tensor) -> Tensor:
    """Fraction of tokens on which each latent fires, rho_i [F]."""
    return (z > 0).double().mean(dim=0)


def dead_fraction(density: Tensor) -> float:
    """Latents that never fired in the window the densities were measured on."""
    return float((density == 0).double().mean())


def dense_fraction(density: Tensor, threshold: float = 0.1) -> float:
    """Latents firing on more than `threshold` of tokens (dense / collapsed latents)."""
    return float((density > threshold).double().mean())


def ultra_low_fractions(density: Tensor, thresholds: tuple[float, ...] = (1e-5, 1e-6)) -> dict[str, float]:
    """Fractions of latents with 0 < rho < t (Kissane et al.'s training logs), keyed 'below_<t>'."""
    return {f"below_{t:g}": float(((density > 0) & (density < t)).double().mean()) for t in thresholds}


def density_histogram(density: Tensor, edges: tuple[float, ...] = DENSITY_HIST_EDGES) -> dict[str, Any]:
    """Histogram of log10(rho) for live latents, plus the count of dead ones."""
    live = density[density > 0].double().log10().clamp(edges[0], edges[-1])
    counts = torch.histogram(live, bins=torch.tensor(edges, dtype=torch.float64)).hist
    return {"edges": list(edges), "counts": [int(c) for c in counts], "n_zero": int((density == 0).sum())}


def gini(density: Tensor) -> float:
    """Gini coefficient of latent densities: 0 = all equal, (F-1)/F = one latent takes all (collapse)."""
    p = density.double().flatten().sort().values
    n, total = p.numel(), p.sum()
    if total <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * p).sum() / (n * total))


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as the clean model, 0 = as bad as zeros."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_score(kl_sae: float, kl_zero: float) -> float:
    """(KL_zero - KL_sae) / KL_zero with KL(p_clean || p_new): 1 = no change to the model's outputs."""
    return (kl_zero - kl_sae) / kl_zero


def _pearson(n: int, sx: float, sxx: float, sy: float, syy: float, sxy: float) -> float:
    """Pearson correlation from running sums; nan when either side is constant (e.g. TopK's L0)."""
    cov, vx, vy = sxy / n - sx * sy / n**2, sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
    return cov / (vx * vy) ** 0.5 if vx > 1e-12 and vy > 1e-12 else float("nan")


def _token_cosines(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(dim=-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-30)


class MetricsAccumulator:
    """Streams (x, x_hat, z) batches; `compute()` gives dataset-level metrics in float64.

    The FVU denominator sum ||x - mean(x)||^2 is merged across batches with Chan et al.'s
    parallel-variance update, so it equals N * sum_j Var_j(x) over the whole stream.
    """

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.n_tokens = 0
        self.mean: Tensor | None = None
        self.scatter = 0.0
        self.sums = dict.fromkeys(
            ("sse", "x_sq", "x_hat_sq", "dot", "cos", "l2_ratio", "l0", "l0_sq", "norm", "norm_sq", "l0_norm"), 0.0
        )
        self.zero_tokens = 0
        self.fire_counts = torch.zeros(n_features, dtype=torch.int64)
        self.l0_counts = torch.zeros(n_features + 1, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        x64, h64 = x.double(), x_hat.double()
        b = x64.shape[0]
        batch_mean = x64.mean(dim=0)
        batch_scatter = float((x64 - batch_mean).pow(2).sum())
        if self.mean is None:
            self.mean, self.scatter = batch_mean, batch_scatter
        else:
            delta, total = batch_mean - self.mean, self.n_tokens + b
            self.scatter += batch_scatter + float(delta.pow(2).sum()) * self.n_tokens * b / total
            self.mean = self.mean + delta * (b / total)
        self.n_tokens += b
        counts = l0(z)
        s = self.sums
        s["sse"] += float((x64 - h64).pow(2).sum())
        s["x_sq"] += float(x64.pow(2).sum())
        s["x_hat_sq"] += float(h64.pow(2).sum())
        s["dot"] += float((x64 * h64).sum())
        s["cos"] += float(_token_cosines(x64, h64).sum())
        s["l2_ratio"] += float((h64.norm(dim=-1) / x64.norm(dim=-1).clamp_min(1e-30)).sum())
        s["l0"] += float(counts.double().sum())
        s["l0_sq"] += float(counts.double().pow(2).sum())
        norms = x64.norm(dim=-1)
        s["norm"] += float(norms.sum())
        s["norm_sq"] += float(norms.pow(2).sum())
        s["l0_norm"] += float((counts.double() * norms).sum())
        self.zero_tokens += int((counts == 0).sum())
        self.fire_counts += (z > 0).sum(dim=0).cpu()
        self.l0_counts += torch.bincount(counts.cpu(), minlength=self.n_features + 1)

    def compute(self) -> dict[str, Any]:
        if self.n_tokens == 0:
            raise SAEDataError("no tokens were evaluated.")
        n, s = self.n_tokens, self.sums
        density = self.fire_counts.double() / n
        fvu_value = s["sse"] / self.scatter if self.scatter > 0 else float("nan")
        l0_mean = s["l0"] / n
        return {
            "n_tokens": n,
            "fvu": fvu_value,
            "explained_variance": 1.0 - fvu_value,
            "nmse0": s["sse"] / s["x_sq"],
            "cosine": s["cos"] / n,
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["x_hat_sq"] / s["dot"],
            "l0": l0_mean,
            "l0_std": max(s["l0_sq"] / n - l0_mean**2, 0.0) ** 0.5,
            "l0_norm_corr": _pearson(n, s["l0"], s["l0_sq"], s["norm"], s["norm_sq"], s["l0_norm"]),
            "l0_histogram": self.l0_counts.clone(),
            "zero_latent_token_frac": self.zero_tokens / n,
            "density": density,
            "dead_frac": dead_fraction(density),
            "dead_window_tokens": n,
            "dense_frac": dense_fraction(density),
            **ultra_low_fractions(density),
            "density_histogram": density_histogram(density),
            "gini": gini(density),
            "max_density": float(density.max()),
        }


@torch.no_grad()
def evaluate(
    sae: SAE,
    batches: Tensor | Iterable[Any],
    *,
    mode: str = "inference",
    batch_size: int = 4096,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Metrics of `sae` over activations (tensor [N, d] or an iterable of batches / (acts, grads)).

    mode="inference" uses the per-token rule (thresholds for MC/FC); mode="batch" reruns the
    training selection per batch, which depends on the batch size (§3b: flag it in reports).
    """
    if mode not in ("inference", "batch"):
        raise SAEConfigError(f"unknown mode {mode!r}; allowed: inference, batch.")
    acc = MetricsAccumulator(sae.cfg.n_features)
    for i, (x, g) in enumerate(_eval_batches(batches, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        if x.shape[-1] != sae.cfg.d_in:
            raise SAEDataError(f"activations have width {x.shape[-1]} but the SAE has d_in={sae.cfg.d_in}.")
        x, g = to_device(x, sae.W_enc.device), to_device(g, sae.W_enc.device)
        z = sae.encode(x, g) if mode == "inference" else sae.encode_batch(x, g)
        acc.update(x, sae.decode(z, x), z)
    return {**acc.compute(), "mode": mode}


def _eval_batches(batches: Tensor | Iterable[Any], batch_size: int) -> Iterator[Batch]:
    if isinstance(batches, Tensor):
        for start in range(0, batches.shape[0], batch_size):
            yield batches[start : start + batch_size], None
    else:
        for item in batches:
            yield split_item(item)
