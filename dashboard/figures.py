"""Plotly figures for the pages; pure functions of store records so they can be tested without Streamlit."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go


def activation_histogram(counts: list[int], edges: list[float]) -> go.Figure:
    """Counts over the store's shared log-spaced bins; empty outer bins are trimmed."""
    nonzero = [i for i, c in enumerate(counts) if c]
    lo, hi = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, len(counts))
    centres = [float(np.sqrt(edges[i] * edges[i + 1])) for i in range(lo, hi)]
    fig = go.Figure(go.Bar(x=centres, y=counts[lo:hi], name="activations"))
    fig.update_layout(xaxis_title="activation", yaxis_title="count", xaxis_type="log", height=260,
                      margin=dict(l=10, r=10, t=30, b=10), title="Activation histogram (positive values)")
    return fig


def _labelled_curve(xs: list[float], ys: list[float], labels: list[str], x_title: str, y_title: str,
                    title: str) -> go.Figure:
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers+text", text=labels, textposition="top center"))
    fig.update_layout(xaxis_title=x_title, yaxis_title=y_title, title=title, height=360,
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def steering_tradeoff(points: list[dict[str, Any]]) -> go.Figure:
    """Effect (Δ log p of the feature's tokens) against cost (KL on neutral text), one point per coefficient."""
    return _labelled_curve([p["kl"] for p in points], [p["effect"] for p in points],
                           [f"c={p['coefficient']:g}" for p in points], "cost: KL(steered ‖ clean) per token (nats)",
                           "effect: Δ log p(feature's top tokens)", "Steering: effect against cost")


def unlearning_tradeoff(points: list[dict[str, Any]]) -> go.Figure:
    """Forgetting against retention cost (KL on neutral text), one point per number of clamped features."""
    return _labelled_curve([p["kl"] for p in points], [p["forgetting"] for p in points],
                           [f"n={p['n_features']}" for p in points], "cost: KL(clamped ‖ clean) per token (nats)",
                           "forgetting: Δ log p(concept text) (nats)", "Unlearning: forgetting against cost")


def head_bars(shares: list[float], title: str = "Head attribution (share of the decoder norm)") -> go.Figure:
    """One bar per attention head."""
    fig = go.Figure(go.Bar(x=[f"H{h}" for h in range(len(shares))], y=shares))
    fig.update_layout(xaxis_title="head", yaxis_title="share", title=title, height=280,
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def source_bars(tokens: list[str], terms: list[float]) -> go.Figure:
    """One bar per source position: its term (summed over heads) in the feature's pre-activation."""
    labels = [f"{j}:{t!r}" for j, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=labels, y=terms))
    fig.update_layout(xaxis_title="source position", yaxis_title="term", height=300,
                      title="Direct feature attribution by source position (summed over heads)",
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


def tradeoff(saes: list[dict[str, Any]], metric: str, label: str) -> go.Figure:
    """L0 against `metric` across SAEs, one labelled point per SAE; SAEs without the metric are left out."""
    points = [s for s in saes if isinstance(s["metrics"].get(metric), int | float) and "l0" in s["metrics"]]
    fig = go.Figure(go.Scatter(
        x=[s["metrics"]["l0"] for s in points], y=[s["metrics"][metric] for s in points],
        text=[s["name"] for s in points], mode="markers+text", textposition="top center",
    ))
    fig.update_layout(xaxis_title="L0", yaxis_title=label, title=f"L0 vs {label}", height=340,
                      margin=dict(l=10, r=10, t=40, b=10))
    xs = [s["metrics"]["l0"] for s in points]
    if xs:  # room on both sides so the labels of the outermost points are not cut off
        pad = max(0.15 * (max(xs) - min(xs)), 1.0)
        fig.update_xaxes(range=[min(xs) - pad, max(xs) + pad])
    return fig


def log_density_histograms(densities: dict[str, np.ndarray]) -> go.Figure:
    """Overlaid log10-density histograms per SAE; dead features (density 0) are counted apart, not plotted."""
    fig = go.Figure()
    for name, dens in densities.items():
        alive = dens[dens > 0]
        fig.add_trace(go.Histogram(x=np.log10(alive), name=name, opacity=0.55, xbins=dict(size=0.25)))
    fig.update_layout(barmode="overlay", xaxis_title="log10 feature density", yaxis_title="features", height=340,
                      title="Feature density (live features)", margin=dict(l=10, r=10, t=40, b=10))
    return fig


def dead_over_training(logs: dict[str, list[dict[str, Any]]]) -> go.Figure:
    """Dead fraction against training step, one line per SAE that has a training log."""
    fig = go.Figure()
    for name, log in logs.items():
        rows = [r for r in log if r["dead_frac"] is not None]
        fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r["dead_frac"] for r in rows], name=name,
                                 mode="lines+markers"))
    fig.update_layout(xaxis_title="step", yaxis_title="dead fraction", title="Dead fraction over training",
                      height=300, margin=dict(l=10, r=10, t=40, b=10))
    return fig
