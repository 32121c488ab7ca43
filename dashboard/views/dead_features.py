"""Dead features page: dead and dense fractions, density histograms and dead fraction over training."""

from __future__ import annotations

import streamlit as st

from dashboard import figures
from dashboard.data import get_store
from experiments.analysis.stats import DENSE_THRESHOLD


def render() -> None:
    st.title("Dead features")
    store = get_store()
    if store is None:
        return
    saes = store.saes()
    densities = {s["name"]: store.densities(s["name"]) for s in saes}
    st.caption(f"Dead: never active on the analysed rows. Dense: active on more than {DENSE_THRESHOLD:.0%} of them.")
    for column, s in zip(st.columns(len(saes)), saes, strict=True):
        dens = densities[s["name"]]
        column.metric(f"{s['name']} dead", f"{(dens == 0).mean():.1%}")
        column.metric(f"{s['name']} dense", f"{(dens > DENSE_THRESHOLD).mean():.1%}")
    st.plotly_chart(figures.log_density_histograms(densities), width="stretch")
    logs = {s["name"]: store.training_log(s["name"]) for s in saes}
    logs = {name: log for name, log in logs.items() if log}
    if logs:
        st.plotly_chart(figures.dead_over_training(logs), width="stretch")
    else:
        st.info("No SAE in the store has a training log (train_log.jsonl beside its weights).")
    name = st.selectbox("Dead features of", list(densities), key="dead_sae")
    dead = store.dead_features(name)
    if dead:
        st.write(f"{len(dead)} dead feature(s) in {name}:")
        st.dataframe({"feature": dead}, width="stretch", hide_index=True, height=240)
    else:
        st.success(f"{name} has no dead features on the analysed rows.")


if __name__ == "__main__":  # st.navigation runs this file as a script (dashboard/navigation.py)
    render()
