"""What one batch of training or evaluation data is: (acts [B, d], grads [B, d] | None), and its checks.

Shared by the training streams (sae/training/streams.py), evaluation (sae/metrics.py) and
calibration (sae/calibration.py), which all accept a tensor or an (acts, grads) pair per item.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae.errors import SAEDataError

Batch = tuple[Tensor, Tensor | None]


def split_item(item: Any) -> Batch:
    """A yielded item -> (acts, grads | None): a tensor, or an (acts, grads) pair."""
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
        return item[0], item[1]
    raise SAEDataError(
        f"each batch must be a tensor [B, d] or an (acts, grads) pair of tensors, got {type(item).__name__}."
    )


def check_finite(x: Tensor, grads: Tensor | None, where: str) -> None:
    """SAEDataError naming `where`, the first bad row and the count when acts or grads hold NaN/inf."""
    for name, t in (("activations", x), ("gradients", grads)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            raise SAEDataError(non_finite_message(name, where, int(bad.any(dim=1).nonzero()[0, 0]), int(bad.sum())))


def non_finite_message(name: str, where: str, row: int, count: int) -> str:
    """What check_finite (and the trainer's device-side check, sae/training/finite_guard.py) says about bad data."""
    return f"{name} contain NaN/inf at {where}, first in row {row} ({count} bad values); nothing was updated with them."
