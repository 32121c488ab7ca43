"""The language-model helpers the pages share: a text's SAE latents at a hook, and the neutral contexts a steering
sweep is scored on (once per model). Tokenising and hook activations live in experiments/steering.py, as does
InputError: the one message a page shows for an empty text or an SAE that does not fit the model's hook."""

from __future__ import annotations

import streamlit as st
import torch

from experiments.steering import InputError, hook_activations, neutral_contexts, prompt_tokens

__all__ = ["InputError", "features_on_text", "neutral"]


@torch.no_grad()
def features_on_text(model, sae_model, hook: str, text: str) -> tuple[list[str], torch.Tensor]:
    """Token strings and latents [T, F] of `text` (BOS dropped: it is not in the cache either)."""
    tokens = prompt_tokens(model, text)
    acts = hook_activations(model, hook, tokens, sae_model.cfg.d_in).to(sae_model.W_enc.device)
    z = sae_model.encode(acts)[1:].cpu()  # the page reads it on the host
    return [model.tokenizer.decode([t]) for t in tokens[0, 1:].tolist()], z


@st.cache_resource(show_spinner=False, max_entries=2)
def neutral(_model, model_key: str):
    """The fixed neutral contexts a sweep is scored on (8 x 64 tokens of the default corpus), once per model."""
    return neutral_contexts(_model)
