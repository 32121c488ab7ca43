"""Data-dependent initialisation (docs/ALGORITHMS.md §0): scalar normalisation c, b_pre and the encoder scale.

b_pre starts at the geometric median of ~32k activations (OpenAI's sparse_autoencoder), computed
with Weiszfeld's algorithm; W_enc = W_dec^T is set when the SAE is constructed (sae/base.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice

import torch
from torch import Tensor

from sae.base import SAE
from sae.batch_items import Batch, check_finite
from sae.config import TrainConfig
from sae.distributed import Collectives
from sae.normalization import estimate_scale
from sae.sparse_code import decode_sparse
from sae.training.streams import BatchStream


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """argmin_y sum_i ||x_i - y|| by Weiszfeld iterations in float64 (robust to outliers, unlike the mean)."""
    x = points.double()
    y = x.mean(dim=0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w.unsqueeze(1) * x).sum(dim=0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * (y.norm() + 1e-12):
            break
    return y.to(points.dtype)


@torch.no_grad()
def initialize_from_data(sae: SAE, stream: BatchStream, cfg: TrainConfig, total_steps: int, coll: Collectives) -> None:
    """Estimate the scalar normalisation c, then set b_pre to the geometric median (§0)."""
    gm_batches = math.ceil(cfg.geometric_median_rows / cfg.batch_size)
    norm_batches = min(cfg.norm_estimation_batches, total_steps) if sae.cfg.normalization == "scalar" else 0
    if not stream.reiterable:  # one-shot data is replayed from memory: read only what b_pre needs
        norm_batches = min(norm_batches, gm_batches)
    n_read = min(max(norm_batches, gm_batches), total_steps)
    if stream.reiterable:
        first: Iterable[Batch] = islice(stream.batches(0), n_read)
    else:
        first = stream.peek(n_read)
    quota = max(1, cfg.geometric_median_rows // coll.world_size)  # b_pre sample rows from this rank
    norm_sum, norm_rows, sample, held = 0.0, 0, [], 0
    first_batch: Batch | None = None
    for j, (x, g) in enumerate(first):
        if first_batch is None:
            first_batch = (x, g)
        check_finite(x, None, f"batch {j} (read to initialise the normalisation and b_pre)")
        if j < norm_batches:
            norm_sum += float(x.double().norm(dim=1).sum())
            norm_rows += x.shape[0]
        if held < quota:
            sample.append(x[: quota - held])
            held += sample[-1].shape[0]
    if norm_batches:
        totals = coll.sum_(torch.tensor([norm_sum, float(norm_rows)], dtype=torch.float64))
        sae.norm_scale.fill_(estimate_scale(float(totals[0]), int(totals[1]), sae.cfg.d_in))
    x_n, _, _ = sae.normalize(coll.cat(torch.cat(sample)))
    sae.b_dec.copy_(geometric_median(x_n))
    if cfg.encoder_init_scale:
        scale_encoder(sae, first_batch, coll)
    for tensor in [*sae.parameters(), *sae.buffers()]:  # every rank starts from rank 0's exact state
        coll.broadcast_(tensor.data)


@torch.no_grad()
def scale_encoder(sae: SAE, batch: Batch | None, coll: Collectives) -> None:
    """W_enc <- c * W_enc with c = <x - b_pre, x_hat0 - b_pre> / ||x_hat0 - b_pre||^2 on one training batch.

    At initialisation (b_enc = 0) every selection rule is invariant to a global encoder scale, so c is
    the least-squares best scalar for the first reconstruction. Without it, a batch-level rule
    (Mutual-Choice) gives a few high-norm tokens hundreds of tied-init latents each and starts at
    FVU >> 1. A data-driven variant of OpenAI's optional encoder rescaling (docs/ALGORITHMS.md §0); our choice.
    """
    if batch is None:
        return
    x_n, g_n, _ = sae.normalize(*batch)
    target = x_n - sae.b_dec
    code = sae.encode_train_sparse(x_n, g_n).code
    recon = decode_sparse(code, sae.W_dec)
    sums = coll.sum_(torch.stack([(target * recon).sum(), recon.pow(2).sum()]).double())
    if float(sums[1]) > 0 and float(sums[0]) > 0:
        sae.W_enc.mul_(float(sums[0] / sums[1]))
