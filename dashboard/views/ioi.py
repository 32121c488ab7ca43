"""IOI page: an SAE against supervised feature dictionaries on indirect-object-identification prompts (Makelov et
al. 2024, experiments/ioi.py): sufficiency, necessity and sparse control for both, and each attribute's best-latent
F1 — `saewb ioi` with a table and a figure."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from activations.hf_backend import backend_of_hook
from dashboard.data import get_store, model_and_sae, pick_sae
from experiments.ioi import ATTRIBUTES, N_NAMES, POSITIONS, IOIError, IOIResult, run_ioi

METHODS = ("supervised", "sae")


def summary_rows(r: IOIResult) -> list[dict]:
    """One row per method: sufficiency, necessity, FVU and the control of each attribute (the SAE at its largest
    n); None where a quantity is undefined (the node barely matters at this position)."""
    largest = max(r.control["sae"], key=int) if r.control["sae"] else None
    rows = []
    for method in METHODS:
        control = r.control["supervised"] if method == "supervised" else r.control["sae"].get(largest, {})
        label = method if method == "supervised" else f"sae (≤ {largest} latents)"
        rows.append({"method": label, "sufficiency": r.sufficiency[method], "necessity": r.necessity[method],
                     "FVU": r.fvu[method],
                     **{f"control {a}": (control.get(a) or {}).get("prompt") for a in ATTRIBUTES}})
    return rows


def figure(r: IOIResult) -> go.Figure:
    """Grouped bars: each measure for the supervised dictionary and the SAE (1 is the ideal for all of them)."""
    rows = summary_rows(r)
    measures = ["sufficiency", "necessity", *(f"control {a}" for a in ATTRIBUTES)]
    fig = go.Figure([go.Bar(name=row["method"], x=measures, y=[row[m] for m in measures]) for row in rows])
    fig.update_layout(barmode="group", height=340, yaxis_title="fraction (1 = ideal)",
                      title=f"IOI at {r.hook} ({r.position}): SAE against supervised dictionaries",
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def show(r: IOIResult) -> None:
    a, b, c, d = st.columns(4)
    a.metric("Clean logit diff", f"{r.logit_diff_clean:.3f}")
    b.metric("Accuracy", f"{r.accuracy:.1%}")
    c.metric("Node mean-ablated", f"{r.logit_diff_mean_ablated:.3f}")
    d.metric("SAE L0 at the node", f"{r.sae_l0:.1f}")
    if r.sufficiency["sae"] is None:
        other = [p for p in POSITIONS if p != r.position][0]
        st.warning(f"Mean-ablating {r.position} barely moves the logit diff here, so sufficiency and necessity are "
                   f"undefined; try the position {other}.")
    st.dataframe(summary_rows(r), hide_index=True, width="stretch")
    st.plotly_chart(figure(r), width="stretch")
    st.markdown("**SAE control by the number of latents edited** (fraction of the move to the counterfactual)")
    st.dataframe([{"latents": n, **{a: entry[a]["prompt"] for a in ATTRIBUTES},
                   **{f"changed {a}": entry[a]["changed"] for a in ATTRIBUTES}}
                  for n, entry in r.control["sae"].items()], hide_index=True, width="stretch")
    st.markdown("**Best-latent F1 per attribute** (mean over its values)")
    st.dataframe([{"attribute": a, "F1": r.f1[a]["mean"]} for a in ATTRIBUTES], hide_index=True, width="stretch")
    st.caption(f"{r.n_prompts} prompts, {len(r.names)} names, seed {r.seed}, {r.seconds:.0f} s. Sufficiency: the "
               "clean logit diff over mean-ablation kept when the reconstruction is spliced in; necessity: the drop "
               "when it is ablated and the error kept; control: how far editing one attribute moves the output "
               "toward the counterfactual prompt's (docs/ALGORITHMS.md §9).")


def render() -> None:
    st.title("IOI: SAE vs supervised dictionaries")
    store = get_store()
    if store is None:
        return
    name = pick_sae(store)
    hook = store.sae(name)["hook"]
    if backend_of_hook(hook) != "transformer_lens":
        st.info(f"IOI reads transformer_lens hooks (blocks.L.hook_resid_post ...); {name} reads {hook!r}.")
        return
    c1, c2, c3, c4 = st.columns(4)
    n_prompts = int(c1.number_input("prompts", min_value=16, max_value=2000, value=200, step=8))
    n_names = int(c2.number_input("names", min_value=2, max_value=64, value=N_NAMES))
    position = c3.selectbox("position", POSITIONS, help="s2: the second S token; end: the last token")
    seed = int(c4.number_input("seed", min_value=0, value=0))
    key = (name, n_prompts, n_names, position, seed)
    results = st.session_state.setdefault("ioi_results", {})
    if st.button("Run IOI", key="run_ioi", type="primary"):
        loaded = model_and_sae(store, name)
        if loaded is None:
            return
        model, sae_model, hook = loaded
        with st.spinner(f"{n_prompts} IOI prompts at {hook} (about two minutes for 200 on two CPU cores) ..."):
            try:
                results[key] = run_ioi(model, sae_model, hook, n_prompts=n_prompts, seed=seed, position=position,
                                       n_names=n_names, sae_label=name)
            except IOIError as exc:
                st.error(str(exc))
                return
    if key in results:
        show(results[key])
    else:
        st.caption("Runs the model on ABBA/BABA prompts and their one-attribute counterfactuals; `saewb ioi --sae "
                   "DIR --json` does the same from a script.")


if __name__ == "__main__":  # st.navigation runs this file as a script (dashboard/navigation.py)
    render()
