"""Attention-output SAEs (Kissane et al. 2024, docs/ALGORITHMS.md §8): features of `blocks.L.attn.hook_z`, head by head.

An SAE on hook_z reads the concatenation of every head's output z (n_heads blocks of d_head), so each decoder
row and each encoder column splits into per-head blocks:

- weight-based head attribution: head h's share of feature f is ‖W_dec[f, h-block]‖ / Σ_h' ‖W_dec[f, h'-block]‖
  (sums to 1 per feature); a feature is "dominated by one head" when one share is >= 0.9 (Kissane's
  polysemantic-head statistic counts these per layer);
- direct feature attribution (DFA): the pre-activation a_f = (x_n − b_pre)·W_enc[:, f] + b_enc[f] is linear in
  the normalised input, so each head's term (x_n − b_pre)[h-block]·W_enc[h-block, f] is its exact share, and
  the terms plus b_enc[f] sum to a_f.
"""

from __future__ import annotations

import torch
from torch import Tensor

HEAD_DOMINANCE = 0.9
"""A feature is dominated by one head when that head has at least this share of its decoder norm."""


class HeadViewError(ValueError):
    """A head view asked of an SAE that does not read attention head outputs (hook_z)."""


def check_hook_z(hook: str | None) -> None:
    if not (hook or "").endswith("attn.hook_z"):
        raise HeadViewError(
            f"head attribution needs an SAE trained on an attention output blocks.L.attn.hook_z; this one reads "
            f"{hook or 'an unnamed hook'}"
        )


def head_attribution(w_dec: Tensor, n_heads: int) -> Tensor:
    """[F, n_heads] share of each feature's decoder norm in each head's block (float64, rows sum to 1)."""
    n_features, width = w_dec.shape
    if n_heads < 1 or width % n_heads:
        raise HeadViewError(f"a decoder row of width {width} does not split into {n_heads} heads")
    norms = w_dec.detach().double().reshape(n_features, n_heads, width // n_heads).norm(dim=-1)
    return norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-300)


def one_head_features(shares: Tensor, threshold: float = HEAD_DOMINANCE) -> int:
    """How many features have one head with >= `threshold` of their attribution."""
    return int((shares.max(dim=1).values >= threshold).sum())


@torch.no_grad()
def head_dfa(sae_model, z: Tensor, feature: int, n_heads: int) -> tuple[Tensor, Tensor]:
    """Each head's exact term in feature `feature`'s pre-activation on rows z [n, n_heads*d_head].

    Returns (terms [n, n_heads], bias [n]) with terms.sum(1) + bias == the pre-activation (the SAE's dtype), on the
    host (the rows move to the SAE's device).
    """
    x_n, _, _ = sae_model.normalize(z.reshape(-1, z.shape[-1]).to(sae_model.W_enc.device))
    x_in = sae_model.encoder_input(x_n)
    width = x_in.shape[1]
    if width % n_heads:
        raise HeadViewError(f"rows of width {width} do not split into {n_heads} heads")
    column = sae_model.W_enc[:, feature]
    terms = (x_in * column).reshape(x_in.shape[0], n_heads, width // n_heads).sum(-1)
    return terms.detach().cpu(), sae_model.b_enc[feature].detach().expand(x_in.shape[0]).cpu()


LINEAR_NORMALIZATIONS = ("none", "scalar")
"""Normalisations under which the encoder input is affine in the row, so it splits over source positions."""


@torch.no_grad()
def source_dfa(sae_model, pattern: Tensor, v: Tensor, feature: int) -> tuple[Tensor, Tensor, Tensor]:
    """Feature `feature`'s pre-activation at one destination position, split over heads and source positions.

    pattern [n_heads, k] is the destination's attention row per head (hook_pattern), v [k, n_kv_heads, d_head]
    the values (hook_v; grouped-query heads share theirs). z[h] = Σ_j pattern[h, j] v[j, h], and the encoder
    input is affine in z under a scalar normalisation, so with f(z) = encoder_input(normalize(z)):

        a_f = Σ_{h,j} (f(c_hj) − f(0))·W_enc[:, f] + f(0)·W_enc[:, f] + b_enc[f],   c_hj = pattern[h, j] v[j, h]

    Returns (terms [n_heads, k], the f(0) term per head [n_heads] (−b_pre's share), b_enc[f]); everything sums to
    the pre-activation exactly (up to float rounding). Computed on the SAE's device, returned on the host.
    """
    normalization = sae_model.cfg.normalization
    if normalization not in LINEAR_NORMALIZATIONS:
        raise HeadViewError(f"attribution to source positions needs a scalar normalisation (the encoder input linear "
                            f"in the row); this SAE uses {normalization!r}")
    n_heads, k = pattern.shape
    if v.shape[1] != n_heads:
        if n_heads % v.shape[1]:
            raise HeadViewError(f"{v.shape[1]} value heads do not divide {n_heads} query heads")
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    d_head = v.shape[-1]
    dtype, device = sae_model.W_enc.dtype, sae_model.W_enc.device
    contrib = pattern.to(device, dtype).T[:, :, None] * v.to(device, dtype)  # [k, n_heads, d_head]: c_hj in head h
    rows = torch.zeros(k, n_heads, n_heads, d_head, dtype=dtype, device=device)
    heads = torch.arange(n_heads, device=device)
    rows[:, heads, heads] = contrib
    rows = rows.reshape(k * n_heads, n_heads * d_head)
    zero = torch.zeros(1, n_heads * d_head, dtype=dtype, device=device)
    f0 = sae_model.encoder_input(sae_model.normalize(zero)[0])
    fc = sae_model.encoder_input(sae_model.normalize(rows)[0]) - f0
    column = sae_model.W_enc[:, feature]
    terms = (fc @ column).reshape(k, n_heads).T
    offsets = (f0[0] * column).reshape(n_heads, d_head).sum(-1)
    return terms.detach().cpu(), offsets.detach().cpu(), sae_model.b_enc[feature].detach().cpu()


def attention_inputs(model, hook: str, token_ids: Tensor, position: int) -> tuple[Tensor, Tensor]:
    """(pattern [n_heads, k], v [k, n_kv_heads, d_head]) of one context at the layer of `hook` (blocks.L.attn.hook_z)
    for the destination `position`: one forward of that context, the only one a source attribution needs."""
    check_hook_z(hook)
    layer = hook.split(".")[1]
    names = [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    _, cache = model.run_with_cache(token_ids.reshape(1, -1), names_filter=names)
    return cache[names[0]][0, :, position, : position + 1], cache[names[1]][0, : position + 1]
