"""Synthetic activations with a planted sparse dictionary, to test that an SAE recovers it.

Each sample is a non-negative combination of unit-norm atoms drawn with Zipf-distributed
frequencies (rank r is chosen with weight r^-s), like the skewed feature densities of real SAEs.
count="fixed" gives every sample exactly k atoms, TopK's ideal case; count="variable" draws each
sample's count uniformly from [min_atoms, max_atoms] and scales a few samples up (real residual
streams have a few very high-norm tokens), the case batch-level rules (Mutual-/Feature-Choice) are for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae.errors import SAEConfigError

SEED_OFFSET = 0x5EED_D1C7
COUNT_MODES = ("fixed", "variable")
GENERATION_CHUNK_ROWS = 32768
"""Rows built at once: bounds the [rows, n_atoms] temporaries (fixed, so the data do not depend on it)."""


@dataclass
class PlantedData:
    """Activations and the ground truth they were built from."""

    acts: Tensor
    "[N, d] activations."
    dictionary: Tensor
    "[n_atoms, d] unit-norm atoms."
    frequencies: Tensor
    "[n_atoms] empirical fraction of samples using each atom."
    support: Tensor | None = None
    "[N, max_atoms] int64 atom indices of each sample; -1 pads samples with fewer atoms."
    coefs: Tensor | None = None
    "[N, max_atoms] coefficients of those atoms (0 on padding), high-norm scale included."
    counts: Tensor | None = None
    "[N] int64 number of atoms in each sample."
    high_norm: Tensor | None = None
    "[N] bool, True for the samples scaled by high_norm_scale."

    def reconstruct(self) -> Tensor:
        """[N, d] sum of coefficient-weighted atoms per sample: acts minus their noise."""
        assert self.support is not None and self.coefs is not None
        atoms = self.dictionary[self.support.clamp_min(0)]  # padding has coefficient 0
        return (self.coefs.unsqueeze(-1) * atoms).sum(dim=1)


def planted_dictionary_data(
    n_samples: int,
    d: int,
    n_atoms: int,
    k: int,
    *,
    zipf_exponent: float = 1.0,
    coef_range: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.0,
    seed: int = 0,
    count: str = "fixed",
    min_atoms: int | None = None,
    max_atoms: int | None = None,
    high_norm_fraction: float = 0.0,
    high_norm_scale: float = 5.0,
) -> PlantedData:
    """x = sum of distinct atoms (Zipf-weighted choice) with uniform coefficients, plus noise.

    count="fixed": exactly k atoms per sample (min_atoms/max_atoms must stay unset).
    count="variable": a count uniform in [min_atoms, max_atoms] per sample, default [1, 2k - 1] so
    the mean count is exactly k (the SAE's mean L0 budget). high_norm_fraction: exactly
    round(fraction * N) random samples are multiplied by high_norm_scale, noise included (their
    direction is ordinary, only their norm is not). Deterministic for a given seed.
    """
    if count not in COUNT_MODES:
        raise SAEConfigError(f"unknown count {count!r}; allowed: {', '.join(COUNT_MODES)}.")
    if not 0 <= high_norm_fraction <= 1:
        raise SAEConfigError(f"high_norm_fraction must be in [0, 1], got {high_norm_fraction}.")
    if high_norm_scale <= 0:
        raise SAEConfigError(f"high_norm_scale must be > 0, got {high_norm_scale}.")
    # The offset keeps these draws apart from an SAE initialised with the same seed: both would
    # otherwise draw randn(F, d) and the "planted" atoms would equal the untrained decoder rows.
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    dictionary = torch.randn(n_atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    weights = torch.arange(1, n_atoms + 1, dtype=torch.float64) ** (-zipf_exponent)
    if count == "fixed":
        if min_atoms is not None or max_atoms is not None:
            raise SAEConfigError("min_atoms/max_atoms apply to count='variable'; count='fixed' uses exactly k.")
        data = _fixed_count(n_samples, d, k, dictionary, weights, coef_range, noise_std, g)
    else:
        low = 1 if min_atoms is None else min_atoms
        high = 2 * k - 1 if max_atoms is None else max_atoms
        if not 1 <= low <= high <= n_atoms:
            raise SAEConfigError(
                f"need 1 <= min_atoms <= max_atoms <= n_atoms={n_atoms}, got min_atoms={low}, max_atoms={high}."
            )
        data = _variable_count(n_samples, d, (low, high), dictionary, weights, coef_range, noise_std, g)
    if high_norm_fraction > 0:  # drawn last, so fraction 0 leaves the earlier draws (and old data) unchanged
        n_high = round(high_norm_fraction * n_samples)
        rows = torch.randperm(n_samples, generator=g)[:n_high]
        data.high_norm[rows] = True
        data.acts[rows] *= high_norm_scale
        data.coefs[rows] *= high_norm_scale
    return data


def _fixed_count(
    n_samples: int,
    d: int,
    k: int,
    dictionary: Tensor,
    weights: Tensor,
    coef_range: tuple[float, float],
    noise_std: float,
    g: torch.Generator,
) -> PlantedData:
    """Exactly k atoms per sample; the draws are those of the original generator, so old data stay bit-identical."""
    n_atoms = dictionary.shape[0]
    support = torch.multinomial(weights.expand(n_samples, -1), k, replacement=False, generator=g)
    low, high = coef_range
    coefs = low + (high - low) * torch.rand(n_samples, k, generator=g)
    acts = torch.empty(n_samples, d)
    for start in range(0, n_samples, GENERATION_CHUNK_ROWS):  # the [rows, k, d] gather, a chunk at a time
        rows = slice(start, start + GENERATION_CHUNK_ROWS)
        acts[rows] = (coefs[rows].unsqueeze(-1) * dictionary[support[rows]]).sum(dim=1)
    if noise_std > 0:
        acts += noise_std * torch.randn(n_samples, d, generator=g)
    frequencies = torch.bincount(support.flatten(), minlength=n_atoms).double() / n_samples
    return PlantedData(
        acts=acts,
        dictionary=dictionary,
        frequencies=frequencies,
        support=support,
        coefs=coefs,
        counts=torch.full((n_samples,), k, dtype=torch.int64),
        high_norm=torch.zeros(n_samples, dtype=torch.bool),
    )


def _variable_count(
    n_samples: int,
    d: int,
    count_range: tuple[int, int],
    dictionary: Tensor,
    weights: Tensor,
    coef_range: tuple[float, float],
    noise_std: float,
    g: torch.Generator,
) -> PlantedData:
    """Counts uniform in count_range; atoms by Gumbel-top-k, a chunk of rows at a time.

    Gumbel-top-k (Kool et al. 2019) orders all atoms as one weighted draw without replacement, so
    the first c of a row's max_atoms picks are a Zipf-weighted draw of c distinct atoms.
    """
    n_atoms = dictionary.shape[0]
    min_atoms, max_atoms = count_range
    counts = torch.randint(min_atoms, max_atoms + 1, (n_samples,), generator=g)
    log_weights = weights.log().float()
    low, high = coef_range
    acts = torch.empty(n_samples, d)
    support = torch.empty(n_samples, max_atoms, dtype=torch.int64)
    coefs = torch.empty(n_samples, max_atoms)
    used = torch.zeros(n_atoms, dtype=torch.int64)
    slots = torch.arange(max_atoms)
    for start in range(0, n_samples, GENERATION_CHUNK_ROWS):
        rows = slice(start, start + GENERATION_CHUNK_ROWS)
        n_rows = counts[rows].shape[0]
        uniform = torch.rand(n_rows, n_atoms, generator=g).clamp_min(torch.finfo(torch.float32).tiny)
        keys = log_weights - (-uniform.log()).log()
        picks = keys.topk(max_atoms, dim=1).indices
        active = slots < counts[rows].unsqueeze(1)
        values = torch.where(active, low + (high - low) * torch.rand(n_rows, max_atoms, generator=g), 0.0)
        code = torch.zeros(n_rows, n_atoms).scatter_(1, picks, values)  # dense [rows, n_atoms]: one matmul
        acts[rows] = code @ dictionary
        if noise_std > 0:
            acts[rows] += noise_std * torch.randn(n_rows, d, generator=g)
        support[rows] = torch.where(active, picks, -1)
        coefs[rows] = values
        used += torch.bincount(picks[active], minlength=n_atoms)
    return PlantedData(
        acts=acts,
        dictionary=dictionary,
        frequencies=used.double() / n_samples,
        support=support,
        coefs=coefs,
        counts=counts,
        high_norm=torch.zeros(n_samples, dtype=torch.bool),
    )


def mean_max_cosine(W_dec: Tensor, dictionary: Tensor) -> float:
    """Mean over true atoms of the best cosine with any decoder row (1.0 = every atom recovered)."""
    learned = W_dec.detach().double()
    learned = learned / learned.norm(dim=1, keepdim=True)
    truth = dictionary.double() / dictionary.double().norm(dim=1, keepdim=True)
    return float((truth @ learned.T).max(dim=1).values.mean())
