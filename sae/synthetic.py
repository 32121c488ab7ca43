"""Synthetic activations with a planted sparse dictionary, to test that an SAE recovers it.

Each sample is a non-negative combination of k unit-norm atoms drawn with Zipf-distributed
frequencies (rank r is chosen with weight r^-s), like the skewed feature densities of real SAEs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SEED_OFFSET = 0x5EED_D1C7


@dataclass
class PlantedData:
    """Activations and the ground truth they were built from."""

    acts: Tensor
    "[N, d] activations."
    dictionary: Tensor
    "[n_atoms, d] unit-norm atoms."
    frequencies: Tensor
    "[n_atoms] empirical fraction of samples using each atom."


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
) -> PlantedData:
    """x = sum of k distinct atoms (Zipf-weighted choice) with uniform coefficients, plus noise."""
    # The offset keeps these draws apart from an SAE initialised with the same seed: both would
    # otherwise draw randn(F, d) and the "planted" atoms would equal the untrained decoder rows.
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    dictionary = torch.randn(n_atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    weights = torch.arange(1, n_atoms + 1, dtype=torch.float64) ** (-zipf_exponent)
    support = torch.multinomial(weights.expand(n_samples, -1), k, replacement=False, generator=g)
    low, high = coef_range
    coefs = low + (high - low) * torch.rand(n_samples, k, generator=g)
    acts = (coefs.unsqueeze(-1) * dictionary[support]).sum(dim=1)
    if noise_std > 0:
        acts += noise_std * torch.randn(n_samples, d, generator=g)
    frequencies = torch.bincount(support.flatten(), minlength=n_atoms).double() / n_samples
    return PlantedData(acts=acts, dictionary=dictionary, frequencies=frequencies)


def mean_max_cosine(W_dec: Tensor, dictionary: Tensor) -> float:
    """Mean over true atoms of the best cosine with any decoder row (1.0 = every atom recovered)."""
    learned = W_dec.detach().double()
    learned = learned / learned.norm(dim=1, keepdim=True)
    truth = dictionary.double() / dictionary.double().norm(dim=1, keepdim=True)
    return float((truth @ learned.T).max(dim=1).values.mean())
