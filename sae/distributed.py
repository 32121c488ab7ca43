"""Data-parallel training on torch.distributed: the same maths as one process on the global batch.

With W ranks and batch_size B, every rank trains on its own B/W rows of each global batch of B.
Everything a step needs across rows is reduced, so all ranks hold identical weights and state:

- the NMSE denominators (global-batch variance), so the summed loss is the global-batch loss;
- the gradients (summed), so every rank takes the same clipped Adam step;
- Mutual-Choice's top-(k*B) and Feature-Choice's per-latent top-m_i selections, through the
  global k*B-th value / per-latent m_i-th value of the pre-activations (ties aside, the same set);
- latent firing counts (dead tracking, densities) and the MC/FC inference thresholds (min);
- the initial normalisation scale and geometric-median sample.

`Collectives` is the single-process identity; `ProcessGroupCollectives` wraps an initialised
process group (gloo on CPU, NCCL on GPU). Checkpoints and logs are written by rank 0 only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sae.errors import SAEConfigError
from sae.sparse_code import top_entries


class Collectives:
    """One process: every reduction returns its input."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place."""
        return t

    def min_(self, t: Tensor) -> Tensor:
        """Elementwise minimum over ranks, in place."""
        return t

    def cat(self, t: Tensor) -> Tensor:
        """Every rank's tensor (same shape on all ranks) concatenated along dim 0, rank order."""
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        """Rank 0's value, in place."""
        return t


class ProcessGroupCollectives(Collectives):
    """Collectives over the default torch.distributed process group (must be initialised)."""

    def __init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun (see the README).")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def sum_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def cat(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def broadcast_(self, t: Tensor) -> Tensor:
        dist.broadcast(t, src=0)
        return t


SINGLE_PROCESS = Collectives()


def default_collectives() -> Collectives:
    """The process group's collectives when torch.distributed is initialised with W > 1, else single-process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollectives()
    return SINGLE_PROCESS


def check_divisible(batch_size: int, world_size: int) -> None:
    """Data parallelism splits each global batch evenly over the ranks."""
    if batch_size % world_size:
        raise SAEConfigError(
            f"batch_size={batch_size} must be a multiple of the number of ranks ({world_size}): each rank "
            f"trains on batch_size / ranks rows of every batch."
        )


def centred_sum_of_squares(x: Tensor, coll: Collectives) -> Tensor:
    """sum_t ||x_t - mean(x)||^2 over the global batch (x: this rank's rows), without gradient."""
    if coll.world_size == 1:
        return (x - x.mean(dim=0)).pow(2).sum()
    with torch.no_grad():
        stats = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
        coll.sum_(stats)
        mean = stats[:-1] / stats[-1]
        return coll.sum_((x - mean).pow(2).sum())


def global_kth_largest(values: Tensor, k: int, coll: Collectives) -> Tensor:
    """The k-th largest of the union of every rank's `values` ([B, F], same shape on every rank)."""
    local = values.flatten()[top_entries(values, min(k, values.numel()))]
    return coll.cat(local).topk(k, sorted=False).values.min()
