"""The feature card: one feature's numbers, contexts, logit lens, neighbours and (for attention-output SAEs) head
views. Shown by the Feature browser and, inline, by the Prompt inspector."""

from __future__ import annotations

import html
from typing import Any

import streamlit as st
import torch

from activations import CacheError, load_cache
from dashboard import figures
from experiments.analysis.store import AnalysisStore, StoreError
from experiments.attention import head_dfa
from sae import SAEError
from sae import load as load_sae


def shaded_tokens(context: dict[str, Any], scale: float) -> str:
    """One context as HTML spans, each token's background as strong as its activation relative to `scale`."""
    spans = []
    for i, (token, act) in enumerate(zip(context["tokens"], context["acts"], strict=True)):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, act / scale))
        border = "border-bottom:2px solid #333;" if i == context["centre"] else ""
        text = html.escape(token).replace("\n", "⏎") or "&nbsp;"
        spans.append(f'<span title="{act:.3f}" style="background:rgba(255,120,0,{alpha:.2f});{border}'
                     f'white-space:pre">{text}</span>')
    value = f"<small>({context['value']:.3f})</small>"
    return f'<div style="font-family:monospace;margin:2px 0">{"".join(spans)} {value}</div>'


def feature_card(store: AnalysisStore, sae: str, idx: int) -> None:
    try:
        card = store.feature(sae, idx)
    except StoreError as exc:
        st.error(str(exc))
        return
    info = store.sae(sae)
    st.subheader(f"{sae} · feature {idx}")
    a, b, c = st.columns(3)
    a.metric("Density", f"{card['density']:.3%}")
    b.metric("Mean activation", f"{card['mean_act']:.3f}")
    c.metric("Max activation", f"{card['max_act']:.3f}")
    if card["density"] == 0:
        st.warning("This feature never fired on the analysed rows (dead).")
        return
    st.plotly_chart(figures.activation_histogram(card["histogram"], info["hist_edges"]), width="stretch")
    st.markdown("**Top activating contexts**")
    st.html("".join(shaded_tokens(ctx, card["max_act"]) for ctx in card["top_contexts"]))
    with st.expander("Samples from activation quantiles"):
        for i, bucket in enumerate(card["quantile_samples"]):
            st.markdown(f"quantile bucket {i + 1}/{len(card['quantile_samples'])}")
            st.html("".join(shaded_tokens(ctx, card["max_act"]) for ctx in bucket) or "<i>none</i>")
    left, right = st.columns(2)
    if card["logit_top"] is None:
        left.info("No logit lens: analyse with --model to get it.")
    else:
        left.markdown("**Logit lens: promoted**")
        left.dataframe([{"token": t, "logit": v} for t, v in card["logit_top"]], hide_index=True, width="stretch")
        right.markdown("**Logit lens: suppressed**")
        right.dataframe([{"token": t, "logit": v} for t, v in card["logit_bottom"]], hide_index=True,
                        width="stretch")
    if info["hook"].endswith("attn.hook_z"):
        head_views(store, sae, idx, card)
    st.markdown("**Nearest features (decoder cosine)**")
    st.dataframe([{"feature": f, "cosine": c} for f, c in card["neighbours"]], hide_index=True, width="stretch")


def head_views(store: AnalysisStore, sae: str, idx: int, card: dict) -> None:
    """Attention-output SAEs: the feature's share of its decoder norm per head, and (on request) each head's
    exact term in its pre-activation on the top contexts (direct feature attribution, read from the cache)."""
    shares = store.head_shares(sae, idx)
    if shares is None:
        st.info("No head attribution in the store: analyse this hook_z SAE with --model to get it.")
        return
    st.plotly_chart(figures.head_bars(shares), width="stretch")
    cache_dir = store.sae(sae)["metrics"].get("analysis_cache")
    if not card["top_contexts"] or not cache_dir or not st.button("Attribute the top contexts to heads (DFA)",
                                                                  key="head_dfa"):
        return
    try:
        cache = load_cache(cache_dir)
        sae_model = load_sae(store.sae(sae)["path"])
    except (CacheError, SAEError) as exc:
        st.error(f"cannot compute DFA: {exc}")
        return
    hook = store.sae(sae)["hook"]
    rows = torch.cat([cache.rows(c["row"], c["row"] + 1, hook=hook) for c in card["top_contexts"]])
    terms, bias = head_dfa(sae_model, rows, idx, len(shares))
    table = [{"context": i, "pre-activation": round(float(t.sum() + b), 4),
              **{f"H{h}": round(float(v), 4) for h, v in enumerate(t)}} for i, (t, b) in enumerate(zip(terms, bias,
                                                                                                     strict=True))]
    mean = terms.double().mean(0).tolist()
    st.plotly_chart(figures.head_bars(mean, "Direct feature attribution: mean head term over the top contexts"),
                    width="stretch")
    st.dataframe(table, hide_index=True, width="stretch")
