"""Threshold calibration for Mutual-Choice and Feature-Choice SAEs (docs/ALGORITHMS.md §2, §3; our design).

During training the inference thresholds are an EMA of the smallest selected value (β = 0.999 from
step min(1000, T/10)), which in a short run still holds its first values (measured: Feature-Choice
at L0 420 instead of 32 after 30 steps). Calibration sets them from the final weights on a sample:

- Mutual-Choice: one θ such that exactly target·N of the N·F pre-activations exceed it, so the mean
  threshold-mode L0 on the sample is the target (default k);
- Feature-Choice: per latent θ_i such that latent i fires on n_i = min(round(s·N·m_i/B), P_i) of the N rows,
  m_i its capacity at the training batch size B, P_i the rows where its pre-activation is positive (a ReLU
  latent fires nowhere else) and s ≥ target/k the smallest scale with Σ n_i = round(target·N): the relative
  capacities stay, and the latents short of positives do not pull the mean L0 below the target.

Each threshold sits midway between the last value kept and the first one left out. The sample and the
L0 reached are recorded in `training_info["calibration"]` (cfg.json). Exact, in bounded memory: a
pass keeps only each batch's candidates (MC) or each column's top values (FC).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sae.base import SAE
from sae.batch_items import split_item
from sae.devices import to_device
from sae.errors import SAEConfigError, SAEDataError
from sae.sparse_code import top_entries

DEFAULT_ROWS = 131_072
"""Calibration sample size: at least 100k rows, or all there are."""
FULL_COLUMN_ABOVE = 4096
"""FC: columns asked to fire on more rows than this keep all their values instead of a running top."""


def calibrate(
    model: SAE,
    activations: Tensor | Iterable[Any],
    target_l0: float | None = None,
    max_rows: int = DEFAULT_ROWS,
    batch_size: int = 4096,
    train_batch_size: int | None = None,
    source: str = "tensor",
) -> dict[str, Any]:
    """Set `model`'s inference thresholds from its final weights; returns (and records) what was done.

    activations: a tensor [N, d] or an iterable of batches (tensors or (acts, grads) pairs); at most
    `max_rows` rows are used. target_l0: the mean L0 to reach (default k). train_batch_size: FC only,
    the B its capacities refer to (default: the batch size it was trained with).
    """
    rule = model.calibration_rule
    if rule is None:
        raise SAEConfigError(f"arch {model.arch!r} has no inference thresholds to calibrate (only mutual_choice "
                             "and feature_choice do).")
    if max_rows < 1:
        raise SAEConfigError(f"max_rows must be a positive integer, got {max_rows!r}.")
    target = float(target_l0 if target_l0 is not None else model.cfg.k)
    if not (math.isfinite(target) and 0 < target < model.cfg.n_features):
        raise SAEConfigError(f"target_l0 must be in (0, n_features={model.cfg.n_features}), got {target_l0!r}.")
    rows = _sample(model, activations, max_rows, batch_size)
    with torch.no_grad():
        if rule == "global":
            theta, reached = _global_threshold(model, rows, target)
            model.threshold.fill_(theta)
        else:
            B = train_batch_size or (model.training_info.get("train_config") or {}).get("batch_size")
            if not B:
                raise SAEConfigError("Feature-Choice calibration needs the training batch size (train_batch_size=...): "
                                     "its capacities m_i are per batch of B tokens.")
            theta_i, reached, scale = _per_latent_thresholds(model, rows, target, int(B))
            model.threshold.copy_(theta_i)
        model.threshold_initialized.fill_(True)
    n = sum(r.shape[0] for r in rows)
    record = {"rows": n, "source": source, "target_l0": target, "reached_l0": reached, "rule": rule}
    if rule == "per_latent":
        record.update(train_batch_size=int(B), capacity_scale=scale)
    model.training_info = {**model.training_info, "calibration": record}
    return record


def _sample(model: SAE, activations: Tensor | Iterable[Any], max_rows: int, batch_size: int) -> list[Tensor]:
    """Up to max_rows rows as normalised batches (the space the thresholds live in)."""
    if isinstance(activations, Tensor):
        items: Iterable[Any] = activations[:max_rows].split(batch_size)
    else:
        items = activations
    out, held = [], 0
    for item in items:
        x = to_device(split_item(item)[0][: max_rows - held], model.W_enc.device)
        if not bool(torch.isfinite(x).all()):
            raise SAEDataError("calibration activations contain NaN/inf; nothing was changed.")
        out.append(model.normalize(x)[0])
        held += x.shape[0]
        if held >= max_rows:
            break
    if held == 0:
        raise SAEDataError("no rows to calibrate the thresholds on.")
    return out


def _global_threshold(model: SAE, rows: list[Tensor], target: float) -> tuple[float, float]:
    """θ with exactly round(target·N) pre-activations above it; each pass keeps `factor`× a batch's share.

    A batch's candidates come from `top_entries` (a per-row bound, then an exact top over the few entries above it,
    as Mutual-Choice training selects), and the two boundary values from two O(n) `kthvalue`s, not a top-k over
    every kept value (measured on 122,880 rows, F=9216: 41.5 s before, 20.2 s)."""
    n_rows = sum(r.shape[0] for r in rows)
    total = max(1, round(target * n_rows))
    factor = 2.0
    while True:
        kept, floors = [], []
        for x_n in rows:
            a = model.pre_acts(x_n)
            m = min(a.numel(), math.ceil(factor * total * x_n.shape[0] / n_rows) + 1)
            top = a.flatten()[top_entries(a, m)]
            kept.append(top)
            floors.append(float(top.min()) if m < a.numel() else -math.inf)
        values = torch.cat(kept)
        n = values.numel()
        if n <= total:
            return -math.inf, float(n) / n_rows
        last_in = float(values.kthvalue(n - total + 1).values)  # the total-th largest
        first_out = float(values.kthvalue(n - total).values)  # the (total + 1)-th largest
        if all(f <= first_out for f in floors):  # no batch can hide a value above the first one left out
            theta = (last_in + first_out) / 2
            return theta, float((values > max(theta, 0.0)).sum()) / n_rows
        factor *= 2


def _per_latent_thresholds(
    model: SAE, rows: list[Tensor], target: float, train_batch_size: int
) -> tuple[Tensor, float, float | None]:
    """(θ, reached L0, capacity scale s): θ_i with n_i = min(round(s·N·m_i/B), P_i) of the N rows above it.

    s is None when even every positive row of every latent with a capacity falls short of the target.
    One pass over the sample when s is its start (the usual case): the counts at the start bound every n_i, so the
    pass that counts the positives P_i also keeps enough of each column's top values; only counts above that bound
    (a larger s, or an unreachable target's P_i) need a second pass. The L0 reached is counted from the kept values
    (every value above θ_i ≥ 0 is among them; a θ_i < 0 lets the P_i positive rows through), not by a third
    pass."""
    n_rows = sum(r.shape[0] for r in rows)
    share = model.capacities(train_batch_size).double().to(model.threshold.device) / train_batch_size
    start = target / model.cfg.k
    bound = torch.round(start * n_rows * share).to(torch.int64)  # ≥ n_i whenever s = start
    positives = torch.zeros(model.cfg.n_features, dtype=torch.int64, device=model.threshold.device)
    kept = _column_tops(model, rows, bound, positives)
    scale, want = capacity_scale(share, positives, n_rows, target, start=start)
    if bool((want > bound).any()):  # a larger s (or every positive row) asks for more: keep tops for those counts
        kept = _column_tops(model, rows, want, None)
    full, top, columns = kept
    theta = torch.empty(model.cfg.n_features, dtype=model.threshold.dtype, device=model.threshold.device)
    above = torch.zeros(model.cfg.n_features, dtype=torch.int64, device=model.threshold.device)
    if top is not None:
        theta[~full] = _between(top, want[~full]).to(theta.dtype)
        above[~full] = (top > theta[~full].relu()).sum(dim=0)
    if columns is not None:
        theta[full] = _between(columns, want[full]).to(theta.dtype)
        above[full] = (columns > theta[full].relu()).sum(dim=0)
    # θ_i < 0 (or -inf): every positive row fires, and there may be more of them than were kept.
    above = torch.where(theta < 0, positives, above)
    return theta, float(above.sum()) / n_rows, scale


def _column_tops(
    model: SAE, rows: list[Tensor], counts: Tensor, positives: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One pass: (full, the top max(counts)+1 values of each other column (sorted), the whole full columns
    (sorted)); full columns are those asked for more than FULL_COLUMN_ABOVE rows. Adds each column's positive
    rows into `positives` when given."""
    full = counts > FULL_COLUMN_ABOVE
    running = int(counts[~full].max()) + 1 if bool((~full).any()) else 0
    top: Tensor | None = None
    whole: list[Tensor] = []
    for x_n in rows:
        a = model.pre_acts(x_n)
        if positives is not None:
            positives += (a > 0).sum(dim=0)
        if running:
            part = a[:, ~full] if top is None else torch.cat([top, a[:, ~full]])
            top = part.topk(min(running, part.shape[0]), dim=0).values  # sorted, largest first
        if bool(full.any()):
            whole.append(a[:, full])
    columns = torch.cat(whole).sort(dim=0, descending=True).values if whole else None
    return full, top, columns


def capacity_scale(
    share: Tensor, positives: Tensor, n_rows: int, target: float, start: float = 1.0
) -> tuple[float | None, Tensor]:
    """The smallest s ≥ start with Σ_i min(round(s·N·share_i), P_i) ≥ round(target·N), and those counts.

    share_i = m_i/B; P_i = positives. When even every positive row cannot reach the target: (None, P).
    """
    total = round(target * n_rows)

    def counts(s: float) -> Tensor:
        return torch.minimum(torch.round(s * n_rows * share).to(torch.int64), positives)

    if int(counts(start).sum()) >= total:
        return start, counts(start)
    reachable = torch.where(share > 0, positives, torch.zeros_like(positives))  # counts(s) as s grows without end
    if int(reachable.sum()) <= total:
        return None, reachable
    lo, hi = start, start * 2
    while int(counts(hi).sum()) < total:
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisection to float resolution; counts(s) is a non-decreasing step function
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if int(counts(mid).sum()) >= total else (mid, hi)
    return hi, counts(hi)


def _between(sorted_values: Tensor, counts: Tensor) -> Tensor:
    """Per column: midway between its counts-th and (counts+1)-th largest value (+inf for 0, -inf for all)."""
    n = sorted_values.shape[0]
    last_in = sorted_values.gather(0, (counts - 1).clamp(0, n - 1).unsqueeze(0)).squeeze(0)
    first_out = sorted_values.gather(0, counts.clamp(0, n - 1).unsqueeze(0)).squeeze(0)
    theta = (last_in + first_out) / 2
    theta = torch.where(counts == 0, torch.full_like(theta, math.inf), theta)
    return torch.where(counts >= n, torch.full_like(theta, -math.inf), theta)
