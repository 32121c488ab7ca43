"""Decoder geometry of an SAE: logit-lens tokens of each latent and its nearest latents by decoder cosine."""

from __future__ import annotations

import re

import torch

from activations.hooks import INPUT_SUFFIX
from experiments.analysis.errors import AnalysisError

N_LOGIT_TOKENS = 10


N_NEIGHBOURS = 10


HF_RESIDUAL_LIKE = r"model\.(embed_tokens|layers\.\d+(\.mlp|\.self_attn)?)"
"""hf-backend module paths whose outputs live in the residual stream (a block, its MLP or attention output)."""


def logit_lens(w_dec: torch.Tensor, hook: str, model) -> torch.Tensor | None:
    """[F, d_model] residual-stream direction of each decoder row (times W_U: its direct effect on the logits),
    or None for a hook the logit lens does not apply to.

    Residual-stream-like hooks map through W_U; an attention hook_z row is split into heads, mapped through
    that layer's W_O and summed (the heads' contribution to the residual stream), then through W_U. On the hf
    backend the same holds for block, MLP and attention outputs, and a row at the input of a Linear that
    writes the residual stream (``o_proj:input``) is mapped through that Linear's weight.
    """
    if model is None:
        return None
    d_model = model.cfg.d_model
    match = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_z", hook)
    if match:
        w_o = model.W_O[int(match.group(1))]  # [heads, d_head, d_model]
        if w_dec.shape[1] != w_o.shape[0] * w_o.shape[1]:
            raise AnalysisError(f"SAE d_in={w_dec.shape[1]} does not match {hook} width "
                                f"{w_o.shape[0] * w_o.shape[1]} of the model")
        resid = torch.einsum("fhd,hdm->fm", w_dec.view(w_dec.shape[0], *w_o.shape[:2]), w_o)
    elif hook.endswith(INPUT_SUFFIX) and isinstance(linear := model.hook_dict.get(hook), torch.nn.Linear):
        # the hf backend: a row at the input of a Linear writing the residual stream (o_proj, down_proj)
        if linear.out_features != d_model or w_dec.shape[1] != linear.in_features:
            return None
        resid = w_dec @ linear.weight.detach().float().T
    elif re.fullmatch(r"(blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)|hook_embed)", hook) or (
        re.fullmatch(HF_RESIDUAL_LIKE, hook)
    ):
        if w_dec.shape[1] != d_model:
            raise AnalysisError(f"SAE d_in={w_dec.shape[1]} does not match the model's d_model={d_model} at {hook}")
        resid = w_dec
    else:
        return None
    return resid


def logit_extremes(resid: torch.Tensor, w_u: torch.Tensor, n: int, chunk: int = 512):
    """Top and bottom `n` (token, logit) per feature, in chunks so [F, vocab] never exists at once."""
    tops, bottoms = [], []
    for lo in range(0, resid.shape[0], chunk):
        logits = resid[lo : lo + chunk] @ w_u
        tops.append(torch.topk(logits, n, dim=1))
        bottoms.append(torch.topk(logits, n, dim=1, largest=False))
    cat = lambda parts: (torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))  # noqa: E731
    return cat(tops), cat(bottoms)


def nearest_by_cosine(w_dec: torch.Tensor, n: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, n] indices and cosines of each decoder row's nearest other rows, computed in row chunks."""
    unit = torch.nn.functional.normalize(w_dec, dim=1)
    n = min(n, unit.shape[0] - 1)
    idx, cos = [], []
    for lo in range(0, unit.shape[0], chunk):
        sims = unit[lo : lo + chunk] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(lo, lo + sims.shape[0])] = -2.0
        top = torch.topk(sims, n, dim=1)
        idx.append(top.indices)
        cos.append(top.values)
    return torch.cat(idx), torch.cat(cos)
