"""Steering page: add, clamp or ablate SAE features while sampling (baseline and steered from the same seed),
and score a coefficient sweep: its effect against its cost (experiments/steering.py holds the maths)."""

from __future__ import annotations

import streamlit as st

from dashboard import figures
from dashboard.data import get_store, model_and_sae, pick_sae
from dashboard.lm import neutral
from experiments.steering import (
    MODES,
    POSITIONS,
    InputError,
    SteeringError,
    parse_coefficients,
    parse_features,
    score_sweep,
    steer_generate,
)
from experiments.unlearning import unlearn_sweep


def render() -> None:
    st.title("Steering")
    store = get_store()
    if store is None:
        return
    name = pick_sae(store)
    info = store.sae(name)
    prompt = st.text_area("Prompt", value="The weather today is", key="steer_prompt")
    left, right = st.columns(2)
    features_text = left.text_input("Features (comma-separated ids)", value="0", key="steer_features")
    coefs_text = right.text_input("Coefficients (one per feature, or one for all)", value="4", key="steer_coefs")
    scale = left.radio("Coefficient unit", ["raw", "× max activation"], horizontal=True, key="steer_scale")
    mode = right.radio("Intervention", list(MODES), horizontal=True, key="steer_mode")
    positions = left.radio("Positions", list(POSITIONS), horizontal=True, key="steer_positions")
    seed = right.number_input("Seed", value=0, step=1, key="steer_seed")
    max_new = left.number_input("New tokens", value=12, min_value=1, max_value=200, key="steer_new")
    temperature = right.slider("Temperature", 0.0, 2.0, 0.0, 0.05, key="steer_temp")
    top_p = left.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="steer_top_p")
    sweep_text = right.text_input("Coefficient sweep for the first feature (optional)", value="", key="steer_sweep")
    score = left.checkbox("Score the sweep: effect against cost on neutral text (add mode)", value=True,
                          key="steer_score")
    with st.expander("Concept unlearning: clamp the features most selective for a concept"):
        unlearning(store, name)
    if not st.button("Generate", key="steer_go"):
        return
    try:
        features = parse_features(features_text, info["n_features"])
        max_acts = [store.feature(name, f)["max_act"] for f in features]
        values = parse_coefficients(coefs_text, len(features), scale, max_acts) if mode != "ablate" else \
            [0.0] * len(features)
        n_sweep = len([p for p in sweep_text.split(",") if p.strip()])
        sweep = parse_coefficients(sweep_text, n_sweep, scale, max_acts[:1] * n_sweep) if n_sweep else []
    except (SteeringError, ValueError) as exc:
        st.error(str(exc))
        return
    loaded = model_and_sae(store, name)
    if loaded is None:
        return
    model, sae_model, hook = loaded
    settings = dict(positions=positions, mode=mode, max_new_tokens=int(max_new), temperature=float(temperature),
                    top_p=float(top_p), seed=int(seed))
    sweep_rows = [[c, *values[1:]] for c in sweep]
    bar = st.progress(0.0, text="generating ...")

    def on_token(step: int, total: int) -> None:
        bar.progress(step / total, text=f"generating token {step + 1} of {total} ({len(sweep_rows) + 2} rows)")

    try:
        result = steer_generate(model, sae_model, hook, features, [values, *sweep_rows], prompt, **settings,
                                on_token=on_token)
    except InputError as exc:
        bar.empty()
        st.error(str(exc))
        return
    bar.empty()
    rows = [{"coefficient": c, "steered": text} for c, text in zip(sweep, result.steered[1:], strict=True)]
    a, b = st.columns(2)
    a.markdown("**Baseline**")
    a.code(prompt + result.baseline, language=None, wrap_lines=True)
    b.markdown(f"**Steered** ({mode}, features {features}, values {[round(v, 3) for v in values]})")
    b.code(prompt + result.steered[0], language=None, wrap_lines=True)
    if rows and score:  # the headline: what each coefficient does, and what it costs
        with st.spinner("scoring the sweep on neutral text ..."):
            try:
                points = score_sweep(model, sae_model, hook, features[:1], sweep, prompt,
                                     neutral(model, str(store.sae(name).get("model"))), int(max_new))
            except InputError as exc:
                st.error(str(exc))
                return
        scored = [vars(p) for p in points]
        st.markdown(f"**Scored sweep over feature {features[0]}** (add at every position of 8 neutral contexts: "
                    "effect = mean Δ log p of its top logit-lens tokens; cost = KL(steered ‖ clean) and ΔCE)")
        st.plotly_chart(figures.steering_tradeoff(scored), width="stretch")
        for row, point in zip(rows, scored, strict=True):
            row.update({k: round(point[k], 4) for k in ("effect", "kl", "delta_ce")})
    if rows:
        st.markdown(f"**Sweep over feature {features[0]}** ({mode}, same seed, other features as above)")
        st.dataframe(rows, hide_index=True, width="stretch")


def unlearning(store, name: str) -> None:
    """`saewb unlearn` in the page: forgetting against retention cost per clamp size, and the containment rate."""
    concept = st.text_input("Concept text", value="", key="unlearn_concept")
    left, mid, right = st.columns(3)
    sizes_text = left.text_input("Clamp sizes", value="1,2,4,8,16", key="unlearn_sizes")
    clamp = mid.number_input("Clamp value", value=0.0, key="unlearn_clamp")
    new_tokens = right.number_input("Generation tokens (containment; 0 skips)", value=16, min_value=0,
                                    max_value=200, key="unlearn_tokens")
    if not st.button("Unlearn", key="unlearn_go"):
        return
    try:
        sizes = tuple(int(n) for n in sizes_text.split(",") if n.strip())
    except ValueError:
        st.error(f"clamp sizes must be comma-separated integers, got {sizes_text!r}")
        return
    loaded = model_and_sae(store, name)
    if loaded is None:
        return
    model, sae_model, hook = loaded
    with st.spinner(f"ranking features for the concept and clamping {list(sizes)} ..."):
        try:
            points = unlearn_sweep(model, sae_model, hook, concept, neutral(model, str(store.sae(name).get("model"))),
                                   sizes, float(clamp), int(new_tokens))
        except (InputError, SteeringError) as exc:
            st.error(str(exc))
            return
    rows = [vars(p) for p in points]
    st.plotly_chart(figures.unlearning_tradeoff(rows), width="stretch")
    st.dataframe([{k: row[k] for k in ("n_features", "forgetting", "kl", "delta_ce", "contained", "features")}
                  for row in rows], hide_index=True, width="stretch")
    st.caption("forgetting: drop of the concept text's mean next-token log p (nats); cost: KL(clamped ‖ clean) and "
               "ΔCE on 8 neutral contexts; contained: share of greedy continuations still holding a concept word "
               "(empty when the concept has no word absent from the neutral contexts)")


if __name__ == "__main__":  # st.navigation runs this file as a script (dashboard/navigation.py)
    render()
