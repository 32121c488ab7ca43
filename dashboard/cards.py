"""The feature card: one feature's numbers, contexts, logit lens, neighbours and (for attention-output SAEs) head
views. Shown by the Feature browser and, inline, by the Prompt inspector."""

from __future__ import annotations

import html
from typing import Any

import streamlit as st
import torch

from activations import CacheError, load_cache
from dashboard import data, figures
from experiments.analysis.store import AnalysisStore, StoreError
from experiments.attention import HeadViewError, attention_inputs, head_dfa, source_dfa
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
    if not card["top_contexts"] or not cache_dir:
        return
    by_head = st.button("Attribute the top contexts to heads (DFA)", key="head_dfa")
    by_source = st.button("Attribute the top context to source positions", key="source_dfa",
                          help="runs the model once on that context for its attention pattern and values")
    if not (by_head or by_source):
        return
    try:
        cache = load_cache(cache_dir)
        sae_model = load_sae(store.sae(sae)["path"])
    except (CacheError, SAEError) as exc:
        st.error(f"cannot compute DFA: {exc}")
        return
    hook = store.sae(sae)["hook"]
    if by_source:
        source_view(store.sae(sae), sae_model, cache, hook, idx, card["top_contexts"][0])
        return
    rows = torch.cat([cache.rows(c["row"], c["row"] + 1, hook=hook) for c in card["top_contexts"]])
    terms, bias = head_dfa(sae_model, rows, idx, len(shares))
    table = [{"context": i, "pre-activation": round(float(t.sum() + b), 4),
              **{f"H{h}": round(float(v), 4) for h, v in enumerate(t)}} for i, (t, b) in enumerate(zip(terms, bias,
                                                                                                     strict=True))]
    mean = terms.double().mean(0).tolist()
    st.plotly_chart(figures.head_bars(mean, "Direct feature attribution: mean head term over the top contexts"),
                    width="stretch")
    st.dataframe(table, hide_index=True, width="stretch")


def source_view(info: dict, sae_model, cache, hook: str, idx: int, context: dict) -> None:
    """DFA by source position on the top context: each (head, source token)'s exact term in the feature's
    pre-activation at the context's peak, from one forward of that context (experiments/attention.py)."""
    token_ids, position = cache.context_of(int(context["row"]))
    try:
        model = data.load_lm(info["model"])
        prefix = torch.tensor(token_ids[: position + 1].tolist(), dtype=torch.long)  # causal: no later token matters
        pattern, v = attention_inputs(model, hook, prefix, position)
        terms, offsets, b_enc = source_dfa(sae_model, pattern, v, idx)
    except HeadViewError as exc:
        st.error(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - a model that cannot load is a message in the page, never a traceback
        st.error(f"cannot run the model {info['model']!r} on this context: {exc}")
        return
    tokens = [model.tokenizer.decode([t]) for t in token_ids[: position + 1].tolist()]
    total = float(terms.sum() + offsets.sum() + b_enc)
    st.caption(f"pre-activation at position {position} ({tokens[-1]!r}) = {total:.4f}: Σ head×source terms "
               f"{float(terms.sum()):.4f} + b_pre terms {float(offsets.sum()):.4f} + b_enc {float(b_enc):.4f}")
    st.plotly_chart(figures.source_bars(tokens, terms.double().sum(0).tolist()), width="stretch")
    flat = [(float(terms[h, j]), h, j) for h in range(terms.shape[0]) for j in range(terms.shape[1])]
    top = sorted(flat, key=lambda t: -abs(t[0]))[:10]
    st.dataframe([{"head": f"H{h}", "source": j, "token": tokens[j], "term": round(t, 4)} for t, h, j in top],
                 hide_index=True, width="stretch")
