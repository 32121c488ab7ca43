"""The plan of a comparison: which run types exist, the TopK baseline and the one-change reference each is paired
with, and the RunConfig of every (run type, k, seed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.evaluation import GRADIENT_RULE, PLAIN_TOPK_RULE
from experiments.training import RunConfig
from sae.errors import SAEConfigError

RUN_SPECS: tuple[tuple[str, str, dict[str, Any], bool], ...] = (  # label, arch, options, on the gradient cache
    ("topk", "topk", {}, False),
    ("mutual_choice", "mutual_choice", {}, False),
    ("feature_choice", "feature_choice", {"fc_capacity": "uniform"}, False),  # the paper's plain rule, named
    ("feature_choice+zipf", "feature_choice", {"fc_capacity": "zipf"}, False),
    # aux_zipf targets under-used latents as well as dead ones (Ayonrinde 2024): compare it with AuxK on MC.
    ("mutual_choice+aux_zipf", "mutual_choice", {"aux_loss": "aux_zipf"}, False),
    # MC's per-token L0 tracks token norm under scalar normalisation; standardising each token removes the norm.
    ("mutual_choice+per_token_standardize", "mutual_choice", {"normalization": "per_token_standardize"}, False),
    ("gradient_topk", "gradient_topk", {}, True),
    ("topk@grads-cache", "topk", {}, True),
)
ON_GRADS = {label: on_grads for label, _, _, on_grads in RUN_SPECS}
"""Whether each run type trains on the gradient cache."""
BASELINE = {False: "topk", True: "topk@grads-cache"}
"""The TopK run each row is paired with: the one trained on the same cache, seed and k."""
ABLATION = {
    "feature_choice+zipf": "feature_choice",
    "mutual_choice+aux_zipf": "mutual_choice",
    "mutual_choice+per_token_standardize": "mutual_choice",
    f"gradient_topk ({PLAIN_TOPK_RULE})": f"gradient_topk ({GRADIENT_RULE})",
}
"""Runs also paired with the run they change one thing of (capacities, aux loss, normalisation, rule)."""


def plan_runs(
    base: RunConfig,
    grads_activations: str | None,
    eval_grads_activations: str | None = None,
    seeds: list[int] | None = None,
    ks: list[int] | None = None,
    labels: list[str] | None = None,
    grads_total_tokens: int | None = None,
) -> list[tuple[str, RunConfig]]:
    """Every run of the comparison: each label of RUN_SPECS at each k and seed, equal training tokens.

    g-SAE and its TopK baseline train on the gradient cache (and are evaluated on the gradient eval cache,
    so g-SAE is scored with its own rule), for grads_total_tokens (default: the base's) since a gradient
    cache is usually small. One seed and one k keep the flat layout out/<label>; a grid writes
    out/k<k>-s<seed>/<label>.
    """
    seeds, ks = seeds or [base.seed], ks or [base.k]
    known = [spec[0] for spec in RUN_SPECS]
    unknown = sorted(set(labels or []) - set(known))
    if unknown:
        raise SAEConfigError(f"unknown comparison run(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    grid = len(seeds) > 1 or len(ks) > 1
    runs = []
    for k in ks:
        for seed in seeds:
            folder = Path(base.out) / (f"k{k}-s{seed}" if grid else "")
            for label, arch, options, on_grads in RUN_SPECS:
                if (labels and label not in labels) or (on_grads and not grads_activations):
                    continue
                cfg = replace(base, arch=arch, k=k, seed=seed, out=str(folder / label.replace("@", "_")),
                              options={**base.options, **options})
                if on_grads:
                    cfg = replace(cfg, activations=grads_activations,
                                  eval_activations=eval_grads_activations or cfg.eval_activations,
                                  total_tokens=grads_total_tokens or cfg.total_tokens)
                runs.append((label, cfg))
    return runs


