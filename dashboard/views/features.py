"""Feature browser: pick a feature by id, by searching its tokens or among those active on a typed text, and show
its card (dashboard/cards.py)."""

from __future__ import annotations

import streamlit as st

from dashboard.cards import feature_card
from dashboard.data import get_store, model_and_sae, pick_sae
from dashboard.lm import InputError, features_on_text
from experiments.analysis.store import AnalysisStore


def feature_from_text(store: AnalysisStore, sae: str) -> int | None:
    """A feature among those that fire on a typed text, strongest first (runs the model and the SAE)."""
    text = st.text_input("Text to run through the model", key="feature_text")
    if not text.strip():
        st.info("Type a text to list the features active on it.")
        return None
    loaded = model_and_sae(store, sae)
    if loaded is None:
        return None
    try:
        _, z = features_on_text(*loaded, text)
    except InputError as exc:
        st.error(str(exc))
        return None
    peak = z.max(0).values
    active = sorted((f for f in range(z.shape[1]) if peak[f] > 0), key=lambda f: -float(peak[f]))
    if not active:
        st.warning("No feature fires on this text.")
        return None
    return st.selectbox(f"{len(active)} feature(s) active on the text", active, key="text_hit",
                        format_func=lambda f: f"{f} (max {float(peak[f]):.2f})")


def choose_feature(store: AnalysisStore, sae: str) -> int | None:
    """The feature id from the number box, or from a search over top tokens and logit-lens tokens."""
    how = st.radio("Pick a feature", ["by id", "by token search", "active on a text"], horizontal=True,
                   key="pick_how")
    if how == "by id":
        return int(st.number_input("Feature id", value=0, step=1, key="feature_id"))
    if how == "active on a text":
        return feature_from_text(store, sae)
    query = st.text_input("Token to search for (top contexts and logit-lens tokens)", key="feature_query")
    if not query.strip():
        st.info("Type a token, e.g. ' the'.")
        return None
    hits = store.search(sae, query)
    if not hits:
        st.warning(f"No feature of {sae} has {query!r} among its top or logit-lens tokens.")
        return None
    labels = {f: f"{f}: {tokens[:80]}" for f, tokens in hits}
    return st.selectbox(f"{len(hits)} matching feature(s)", list(labels), format_func=labels.get, key="hit")


def render() -> None:
    st.title("Feature browser")
    store = get_store()
    if store is None:
        return
    sae = pick_sae(store)
    idx = choose_feature(store, sae)
    if idx is not None:
        feature_card(store, sae, idx)


if __name__ == "__main__":  # st.navigation runs this file as a script (dashboard/navigation.py)
    render()
