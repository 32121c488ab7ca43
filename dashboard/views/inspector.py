"""Prompt inspector: type text, see which features fire on each token, open one in the feature browser."""

from __future__ import annotations

import streamlit as st
import torch

from dashboard.cards import feature_card
from dashboard.data import get_store, model_and_sae, pick_sae
from dashboard.lm import InputError, features_on_text
from dashboard.navigation import pages


def render() -> None:
    st.title("Prompt inspector")
    store = get_store()
    if store is None:
        return
    name = pick_sae(store)
    text = st.text_area("Text", value="The quick brown fox jumps over the lazy dog.", key="inspect_text")
    loaded = model_and_sae(store, name)
    if loaded is None:
        return
    model, sae_model, hook = loaded
    try:
        tokens, z = features_on_text(model, sae_model, hook, text)
    except InputError as exc:
        st.error(str(exc))
        return
    top = torch.topk(z, min(3, z.shape[1]), dim=1)
    rows = [
        {"position": i, "token": tok, **{f"feature {j + 1}": (f"{f} ({v:.2f})" if v > 0 else "")
                                          for j, (f, v) in enumerate(zip(fs, vs, strict=True))}}
        for i, (tok, fs, vs) in enumerate(zip(tokens, top.indices.tolist(), top.values.tolist(), strict=True))
    ]
    st.dataframe(rows, hide_index=True, width="stretch")
    active = torch.nonzero(z.sum(0) > 0).flatten().tolist()
    if not active:
        st.info("No feature fires on this text.")
        return
    ranked = sorted(active, key=lambda f: -float(z[:, f].max()))
    choice = st.selectbox("Features active on this text (strongest first)", ranked, key="inspect_pick",
                          format_func=lambda f: f"{f} (max {float(z[:, f].max()):.2f})")
    feature_card(store, name, int(choice))
    if st.button("Open in the feature browser", key="inspect_open"):
        st.session_state["feature_id"] = int(choice)
        st.session_state["pick_how"] = "by id"
        st.switch_page(pages()["features"])


if __name__ == "__main__":  # st.navigation runs this file as a script (dashboard/navigation.py)
    render()
