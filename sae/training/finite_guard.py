"""NaN/inf in a training step, caught without the host waiting on the device every step.

Reading a device value in Python (`.item()`, `float(t)`, `if t:`) makes the host wait until the GPU has run all
it was given, so the step never does. Instead each step folds its checks into small device tensors (`torch.where`,
no Python branch): the first step whose activations, LM gradients, loss or gradient norm was non-finite, which one,
and what its error message needs. From that step on `skip` is 1.0. It is fused Adam's `found_inf`, the flag
torch's GradScaler uses: Adam then leaves the weights, both moments and the step counts as they were, and the
trainer masks the decoder renormalisation with it, so the SAE stays exactly as after the last good step. The
trainer reads the record (one sync) at every log, before every checkpoint write and at the end, and raises naming
the first bad step: no checkpoint is written after it and no NaN reaches the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.batch_items import non_finite_message
from sae.errors import SAEDataError, SAEError, SAETrainingError

CHECKS = ("activations", "gradients", "loss", "grad_norm")
"""What a step checks, in the order a message names them when several are non-finite at once."""


def screen_batch(x: Tensor, grads: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """(x, grads) with NaN/inf replaced by 0, so every selection rule runs on any batch, and their summary [4]:
    (bad values, first bad row) of the activations, then of the gradients (0, 0 without gradients).

    The step is still marked bad (FiniteGuard.update) and its update skipped; the zeros only keep the forward
    from failing (Mutual-Choice's top-k*B cannot order NaN). One [B, d] pass per input, B*d*F less than the GEMM.
    """
    screened, summary = [], []
    for t in (x, grads):
        if t is None:
            screened.append(None)
            summary.append(x.new_zeros(2, dtype=torch.int64))
            continue
        finite = torch.isfinite(t)
        bad_per_row = finite.logical_not().sum(dim=1)
        summary.append(torch.stack([bad_per_row.sum(), (bad_per_row > 0).to(torch.int64).argmax()]))
        screened.append(torch.where(finite, t, 0))
    return screened[0], screened[1], torch.cat(summary)  # type: ignore[return-value]


class FiniteGuard:
    """The first non-finite step of a run, recorded on the device; `first_bad_step` reads it (a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        "The first non-finite step; -1 while every step was finite."
        self.detail = torch.zeros(6, dtype=torch.float64, device=device)
        "At that step: which check (index into CHECKS), first bad row, bad values, loss, reconstruction, aux."
        self.skip = torch.zeros((), dtype=torch.float32, device=device)
        "1.0 from the first non-finite step on (updated in place): the optimiser's found_inf."

    @torch.no_grad()
    def update(self, step: int, inputs: Tensor, loss: Tensor, rec: Tensor, aux: Tensor, grad_norm: Tensor) -> Tensor:
        """Fold step `step`'s checks in (`inputs`: screen_batch's summary); returns `skip`, 1.0 if this step's update
        must not be applied."""
        bad = torch.stack([inputs[0] > 0, inputs[2] > 0, ~torch.isfinite(loss), ~torch.isfinite(grad_norm)])
        fresh = bad.any() & (self.first < 0)
        which = bad.to(torch.int64).argmax()  # the first check that failed
        row, count = torch.where(bad[0], inputs[1], inputs[3]), torch.where(bad[0], inputs[0], inputs[2])
        detail = torch.stack([which, row, count]).to(torch.float64)
        detail = torch.cat([detail, torch.stack([loss, rec, aux]).to(torch.float64)])
        self.detail.copy_(torch.where(fresh, detail, self.detail))
        self.first.copy_(torch.where(fresh, step, self.first))
        self.skip.copy_(self.first >= 0)
        return self.skip

    def first_bad_step(self) -> int | None:
        """The first non-finite step, or None: one read of the device (the trainer's log/checkpoint/end check)."""
        first = int(self.first)
        return None if first < 0 else first

    def error(self, completed: int, hint: str = "") -> SAEError:
        """The error naming the first bad step (which must exist), found when `completed` steps had run."""
        first = self.first_bad_step()
        assert first is not None
        which, row, count, loss, rec, aux = self.detail.tolist()
        found = (
            f" (Found by the check after {completed} steps: from step {first} on no update was applied and no "
            "checkpoint was written.)"
        )
        check = CHECKS[int(which)]
        if check in ("activations", "gradients"):
            where = f"step {first} (batch {first} of the stream)"
            return SAEDataError(non_finite_message(check, where, int(row), int(count)) + found)
        if check == "loss":
            return SAETrainingError(
                f"the loss became {loss} at step {first} (reconstruction {rec}, aux {aux}); no update was applied. "
                f"Lower lr or check the activations' scale.{hint}{found}"
            )
        return SAETrainingError(f"gradients became non-finite at step {first}; no update was applied.{hint}{found}")
