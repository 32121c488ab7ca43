"""What a run keeps track of besides the weights: per-latent firing statistics, and progress/logging.

A latent is dead once it has not fired (z > fire_threshold) for `dead_tokens` tokens
(OpenAI's `tokens_since_fired`, docs/ALGORITHMS.md §0); the EMA density feeds aux_zipf (§4).
`TrainLogger` shows the progress bar and hands metrics to the caller's `LogFn`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.config import TrainConfig
from sae.distributed import SINGLE_PROCESS, Collectives
from sae.sparse_code import SparseCode

LogFn = Callable[[int, dict[str, float]], None]
"""log_fn(step, metrics): called every cfg.log_every completed steps and at the last one."""


class FeatureTracker:
    """Counts tokens since each latent last fired and keeps an EMA of firing rates."""

    def __init__(
        self, n_features: int, dead_tokens: int, fire_threshold: float, ema_beta: float,
        collectives: Collectives = SINGLE_PROCESS, device: torch.device | str = "cpu",
    ) -> None:
        self.collectives = collectives
        "Data-parallel ranks: firing counts are summed over the global batch."
        self.dead_tokens = dead_tokens
        self.fire_threshold = fire_threshold
        self.ema_beta = ema_beta
        self.device = torch.device(device)
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.int64, device=self.device)
        self.density_ema = torch.zeros(n_features, device=self.device)
        self.since_fired_bound = 0
        "An upper bound on max(tokens_since_fired) the host keeps without reading the device (see may_be_dead)."

    @torch.no_grad()
    def update(self, code: SparseCode) -> None:
        """Count one batch of (detached) latents; only the support can fire. No host sync."""
        fired = self.collectives.sum_(code.fired_count(self.fire_threshold))
        n_tokens = code.support.n_rows * self.collectives.world_size
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired > 0, 0)
        self.since_fired_bound += n_tokens
        rate = fired.to(self.density_ema.dtype) / n_tokens
        self.density_ema.mul_(self.ema_beta).add_(rate, alpha=1 - self.ema_beta)

    def may_be_dead(self) -> bool:
        """False when no latent can be dead yet, known on the host: each step adds at most B tokens to a counter.

        The trainer then skips AuxK, whose candidate search (a nonzero over the dead mask) needs a host sync, with
        the same result: no dead latent means no aux loss. `refresh_bound` tightens the bound at log steps.
        """
        return self.since_fired_bound >= self.dead_tokens

    def refresh_bound(self) -> None:
        """Read max(tokens_since_fired) from the device (a sync: call it where the trainer reads metrics anyway)."""
        self.since_fired_bound = int(self.tokens_since_fired.max())

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> Tensor:
        """The fraction of dead latents, a device scalar (read with the other metrics)."""
        return self.dead_mask().float().mean()

    def state_tensors(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired, "density_ema": self.density_ema}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device, copy=True)
        self.density_ema = tensors["density_ema"].to(self.device, copy=True)
        self.refresh_bound()


class TrainLogger:
    """Progress bar (loss, L0, FVU, dead fraction, tokens/s) and the optional log_fn callback."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, cfg: TrainConfig, log_fn: LogFn | None):
        self.total_steps, self.batch_size, self.every, self.log_fn = total_steps, batch_size, cfg.log_every, log_fn
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not cfg.progress, unit="step", desc="sae")
        self.started, self.start_step = time.perf_counter(), start_step

    def due(self, step: int) -> bool:
        """Whether `step` (completed steps, 1-based) is a log step: every log_every-th and the last."""
        return step % self.every == 0 or step == self.total_steps

    def log(self, step: int, metrics: dict[str, float] | None) -> None:
        """Advance the bar to `step` (completed steps, 1-based); with metrics (read on log and checkpoint steps)
        also refresh its numbers, and on log steps call log_fn."""
        self.bar.update(1)
        if metrics is None:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics["tokens_per_s"] = (step - self.start_step) * self.batch_size / elapsed
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            L0=f"{metrics['l0']:.1f}",
            FVU=f"{metrics['fvu']:.4f}",
            dead=f"{metrics['dead_frac']:.3f}",
            tok_s=f"{metrics['tokens_per_s']:.0f}",
            refresh=False,
        )
        if self.log_fn is not None and self.due(step):
            self.log_fn(step, dict(metrics))

    def close(self) -> None:
        self.bar.close()
