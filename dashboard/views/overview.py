"""Overview page: the SAEs in the store and their sparsity / fidelity trade-off."""

from __future__ import annotations

import streamlit as st

from dashboard import figures
from dashboard.data import get_store

COLUMNS = {"selection_rule": "rule", "l0": "L0", "fvu": "FVU", "ce_loss_recovered": "CE recovered",
           "analysis_dead_frac": "dead", "analysis_dense_frac": "dense"}
PLAIN_TOPK_COLUMNS = {"plain_topk_fvu": "FVU, plain TopK", "plain_topk_ce_loss_recovered": "CE recovered, plain TopK"}
"""g-SAE only: the same dictionary scored without gradients (shown when an SAE in the store has them)."""


def render() -> None:
    st.title("Overview")
    store = get_store()
    if store is None:
        return
    saes = store.saes()
    st.caption(f"{len(saes)} SAE(s) in {store.path}")
    columns = dict(COLUMNS)
    if any(key in s["metrics"] for s in saes for key in PLAIN_TOPK_COLUMNS):
        columns.update(PLAIN_TOPK_COLUMNS)
    if any("one_head_features" in s["metrics"] for s in saes):  # attention-output SAEs (Kissane et al.)
        columns["one_head_features"] = "features ≥90% one head"
    table = [
        {"name": s["name"], "arch": s["arch"], "F": s["n_features"], "k": s["k"], "hook": s["hook"],
         **{label: s["metrics"].get(key) for key, label in columns.items()}}
        for s in saes
    ]
    st.dataframe(table, width="stretch", hide_index=True)
    heads = [s for s in saes if "one_head_features" in s["metrics"]]
    if heads:
        st.caption("features ≥90% one head: hook_z SAEs' features whose decoder norm lies ≥ 90% in one attention "
                   "head — " + "; ".join(f"{s['name']} ({s['hook']}): {s['metrics']['one_head_features']} of "
                                         f"{s['n_features']}" for s in heads))
    if any(s["arch"] == "gradient_topk" for s in saes):
        st.caption("rule: which inference rule each number used. A g-SAE's main columns use its gradient rule "
                   "(the clean model's loss gradient at the hook); 'plain TopK' columns score the same dictionary "
                   "without gradients.")
    left, right = st.columns(2)
    left.plotly_chart(figures.tradeoff(saes, "fvu", "FVU"), width="stretch")
    if any("ce_loss_recovered" in s["metrics"] for s in saes):
        right.plotly_chart(figures.tradeoff(saes, "ce_loss_recovered", "CE recovered"), width="stretch")
    else:
        right.info("No SAE has CE recovered: evaluate with `saewb eval --model ...` before analysing.")


if __name__ == "__main__":  # st.navigation runs this file as a script (dashboard/navigation.py)
    render()
