"""Sparse latent codes and the kernels that train on them without dense [B, F] gradients.

A training step needs the dense pre-activations A = (x - b_pre) W_enc + b_enc once, to choose the
support S (the architecture's rule). Everything after that only involves the B*k selected entries:

- decode:   x_hat = sum_j z_j W_dec[c_j] + b_pre, an `embedding_bag` over each token's latents
            (B*k*d multiply-adds instead of the dense B*F*d; its backward gives dW_dec and dz);
- encoder backward: dW_enc = X^T dA with dA sparse, a CSR sparse x dense product (B*k*d instead
                    of B*F*d), and db_enc a scatter-add.

So the only O(B*F*d) work left is the forward GEMM: the "decode only the k active latents" and
"encoder backward that touches only selected latents" ideas of Gao et al. 2024 (§A.3) and
sparsify's kernels, written here on stock torch ops so they run on any CPU or GPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F_nn
from torch import Tensor


@dataclass
class Support:
    """The (token, latent) pairs a selection keeps, sorted by token: the sparse form of a mask S [B, F]."""

    rows: Tensor
    "[nnz] int64 token index of each entry, non-decreasing."
    cols: Tensor
    "[nnz] int64 latent index of each entry."
    n_rows: int
    n_features: int
    per_row: int | None = None
    "k when every row holds exactly k entries (TopK, g-SAE): enables the [B, k] fast paths."

    @classmethod
    def from_topk(cls, indices: Tensor, n_features: int) -> Support:
        """From per-row latent indices [B, k] (e.g. `topk(...).indices`)."""
        n_rows, k = indices.shape
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1).to(torch.int64), n_rows, n_features, per_row=k)

    @classmethod
    def from_pairs(cls, rows: Tensor, cols: Tensor, n_rows: int, n_features: int) -> Support:
        """From unordered (row, col) pairs, sorted here into row-major order."""
        order = torch.argsort(rows * n_features + cols)
        return cls(rows[order], cols[order], n_rows, n_features)

    @classmethod
    def from_mask(cls, mask: Tensor) -> Support:
        rows, cols = mask.nonzero(as_tuple=True)  # row-major already
        return cls(rows, cols, mask.shape[0], mask.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    def row_starts(self) -> Tensor:
        """[B + 1] CSR row pointer: entries of row b are [starts[b], starts[b+1]). A scatter-add, not bincount,
        which waits for the GPU to size its output."""
        if self.per_row is not None:
            return torch.arange(0, self.nnz + 1, self.per_row, device=self.cols.device)
        counts = torch.zeros(self.n_rows, dtype=torch.int64, device=self.rows.device)
        counts.index_add_(0, self.rows, torch.ones_like(self.rows))
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def mask(self) -> Tensor:
        """The dense boolean mask [B, F] (for the reference path and tests)."""
        out = torch.zeros(self.n_rows, self.n_features, dtype=torch.bool, device=self.cols.device)
        out[self.rows, self.cols] = True
        return out

    def to_dense(self, values: Tensor) -> Tensor:
        """Dense [B, F] with `values` [nnz] at the support (differentiable; repeated entries add up)."""
        flat = values.new_zeros(self.n_rows * self.n_features)
        index = (self.rows * self.n_features + self.cols,)
        return flat.index_put(index, values, accumulate=True).view(self.n_rows, self.n_features)


@dataclass
class SparseCode:
    """Latents z in sparse form: `values` [nnz] at `support` (z = 0 elsewhere)."""

    support: Support
    values: Tensor

    def dense(self) -> Tensor:
        return self.support.to_dense(self.values)

    def active(self, threshold: float = 0.0) -> Tensor:
        """[nnz] bool: the entries that fire (value > threshold)."""
        return self.values > threshold

    def l0_per_token(self) -> Tensor:
        """[B] number of firing latents per token."""
        fired = self.support.rows[self.active()]
        return torch.bincount(fired, minlength=self.support.n_rows)

    def fired_count(self, threshold: float = 0.0) -> Tensor:
        """[F] tokens on which each latent fires: a scatter-add, so no host sync (a masked index and bincount
        would wait for the GPU to learn their sizes)."""
        counts = torch.zeros(self.support.n_features, dtype=torch.int64, device=self.values.device)
        return counts.index_add_(0, self.support.cols, self.active(threshold).to(torch.int64))


def _csr(support: Support, values: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(
            support.row_starts(), support.cols, values, (support.n_rows, support.n_features)
        )


class _GatherPreActs(torch.autograd.Function):
    """Forward: A[rows, cols] from precomputed pre-activations. Backward: sparse dW_enc, db_enc, and dx or db_pre."""

    @staticmethod
    def forward(ctx, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, pre_acts: Tensor, support: Support,
                b_pre: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_in, W_enc)
        ctx.support = support
        # In x_in's dtype: under autocast the pre-activations are bf16/fp16, and the values (so the whole sparse
        # backward) stay in the weights' fp32.
        if support.per_row is not None:  # a gather along rows: ~15x faster than the paired advanced index on CPU
            return pre_acts.gather(1, support.cols.view(support.n_rows, -1)).view(-1).to(x_in.dtype)
        return pre_acts[support.rows, support.cols].to(x_in.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_in, W_enc = ctx.saved_tensors
        support: Support = ctx.support
        grad = grad.contiguous()
        dA = _csr(support, grad)  # [B, F], nnz entries
        g_x = g_w = g_b = g_pre = None
        if ctx.needs_input_grad[0]:
            g_x = dA @ W_enc.T  # [B, d]
        if ctx.needs_input_grad[1]:
            g_w = (dA.t() @ x_in).T  # [F, d] -> [d, F]
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            g_b = grad.new_zeros(support.n_features).index_add_(0, support.cols, grad)
        if ctx.needs_input_grad[5]:
            # x_in = x - b_pre with x constant: d/db_pre = -sum_rows dA W_enc^T = -W_enc db_enc, a [d, F] @ [F]
            # product instead of the [B, F] x [F, d] sparse one that the row gradients would need
            g_pre = -(W_enc @ g_b)
        return g_x, g_w, g_b if ctx.needs_input_grad[2] else None, None, None, g_pre


def gather_pre_acts(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, pre_acts: Tensor, support: Support,
                    b_pre: Tensor | None = None) -> Tensor:
    """a[rows, cols] with the gradient of a = x_in @ W_enc + b_enc, computed only at the support.

    `pre_acts` must equal x_in @ W_enc + b_enc (computed without autograd, once per step). With `b_pre`, x_in is
    x - b_pre for inputs x that need no gradient, passed without autograd history: b_pre's gradient then comes
    from db_enc (one [d, F] @ [F] product) instead of the per-row gradient of x_in (a sparse [B, F] @ [F, d]).
    """
    if b_pre is not None and x_in.requires_grad:
        raise ValueError("gather_pre_acts with b_pre takes x_in = x - b_pre without autograd history")
    return _GatherPreActs.apply(x_in, W_enc, b_enc, pre_acts, support, b_pre)


def decode_sparse(code: SparseCode, W_dec: Tensor) -> Tensor:
    """sum_j z_j W_dec[c_j] per token [B, d] (no bias), differentiable in z and W_dec."""
    s = code.support
    if s.per_row is not None:
        return F_nn.embedding_bag(
            s.cols.view(s.n_rows, s.per_row), W_dec, mode="sum", per_sample_weights=code.values.view(s.n_rows, -1)
        )
    return F_nn.embedding_bag(s.cols, W_dec, s.row_starts()[:-1], mode="sum", per_sample_weights=code.values)


def topk_support(scores: Tensor, k: int) -> Support:
    """Each row's k largest scores (TopK, Gao et al. 2024 §2.3)."""
    return Support.from_topk(topk_indices(scores, k), scores.shape[-1])


CHUNKED_TOPK_MIN_FEATURES = 4096
"""Below this width torch.topk is as fast on the CPU (measured at F=2304, k=32)."""


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """[B, k] indices of each row's k largest scores, unordered: torch.topk, or on a wide CPU matrix the same
    selection found through chunk maxima (`_chunked_topk`, measured 20-30% faster there; CUDA keeps torch.topk)."""
    n_rows, n_cols = scores.shape
    chunk = 8 if n_cols < 400 * k else 16  # the faster of the two at F/k = 288 and 512 (benchmarks/profile_step.py)
    if (scores.device.type != "cpu" or n_cols < CHUNKED_TOPK_MIN_FEATURES or n_cols % chunk
            or 2 * chunk * k > n_cols or not scores.is_contiguous()):
        return scores.topk(k, dim=-1, sorted=False).indices
    return _chunked_topk(scores, k, chunk)


MAXIMA_CHUNK, MAXIMA_CHUNKED_MIN = 8, 1024
"""The chunk maxima's own top-k goes through chunks of 8 from 1024 maxima on: at B=4096, 1152 maxima with k=32
9.7 ms instead of torch.topk's 17.5, 2048 with k=64 20.8 instead of 30.9 (benchmarks/profile_step.py's shapes)."""


def _chunked_topk(scores: Tensor, k: int, chunk: int) -> Tensor:
    """Exact per-row top-k through chunk maxima. Split each row into F/c interleaved chunks {j, j + F/c, ...} of c
    entries: a chunk holding one of the row's k largest entries has a maximum at least that large, and at most k
    chunks can, so the k largest entries all lie in the k chunks of largest maximum (with ties, enough entries of
    the boundary value do). One max-reduction over the row, then a top-k over F/c maxima and one over k*c
    candidates, instead of a top-k over all F entries."""
    n_rows, n_cols = scores.shape
    width = n_cols // chunk
    view = scores.view(n_rows, chunk, width)  # column j of the view is chunk j
    maxima = view.amax(dim=1)  # [B, F/c], contiguous
    if width >= MAXIMA_CHUNKED_MIN and width % MAXIMA_CHUNK == 0 and 2 * MAXIMA_CHUNK * k <= width:
        chunks = _chunked_topk(maxima, k, MAXIMA_CHUNK)  # the same selection one level down
    else:
        chunks = maxima.topk(k, dim=-1, sorted=False).indices  # [B, k]
    candidates = view.gather(2, chunks.unsqueeze(1).expand(n_rows, chunk, k)).reshape(n_rows, chunk * k)
    best = candidates.topk(k, dim=-1, sorted=False).indices  # position i*k + m: row i of chunk chunks[:, m]
    return (best // k) * width + chunks.gather(1, best % k)


COLUMN_CHUNK, COLUMN_CHUNKED_MIN_ROWS = 8, 256
"""Row chunks of 8, from 256 rows on (measured at B=4096, F=9216, m=15: 190 ms for torch.topk down the columns)."""


def column_topk(matrix: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(values, row indices), each [m, F]: every column's m largest entries, largest first, as
    torch.topk(m, dim=0, sorted=True) gives them (equal values may come in another order). On the CPU a top-k down
    the columns of a contiguous matrix is strided and slow, so there it goes through row-chunk maxima
    (`_column_candidates`) and a top-k over the few candidate rows."""
    if matrix.device.type != "cpu" or not _column_chunkable(matrix, m):
        return matrix.topk(m, dim=0, sorted=True)
    rows = _column_candidates(matrix, m)
    best = matrix.gather(0, rows).topk(m, dim=0, sorted=True)
    return best.values, rows.gather(0, best.indices)


def _column_chunkable(matrix: Tensor, m: int) -> bool:
    n_rows = matrix.shape[0]
    return (matrix.dim() == 2 and matrix.is_contiguous() and n_rows >= COLUMN_CHUNKED_MIN_ROWS
            and n_rows % COLUMN_CHUNK == 0 and 2 * COLUMN_CHUNK * m <= n_rows)


def _column_candidates(matrix: Tensor, m: int) -> Tensor:
    """[m*c, F] row indices that hold each column's m largest entries: the rows of the column's m row chunks
    (chunk j = rows j*c .. j*c + c - 1) of largest maximum. The argument of `_chunked_topk`, down the columns:
    a chunk holding one of the m largest entries has a maximum at least that large, and at most m chunks can.
    The chunk maxima [B/c, F] (one contiguous max-reduction) pick their m best chunks the same way, one level
    down, while they are tall enough."""
    c = COLUMN_CHUNK
    n_rows, n_cols = matrix.shape
    maxima = matrix.view(n_rows // c, c, n_cols).amax(dim=1)  # [B/c, F], contiguous
    if _column_chunkable(maxima, m):
        below = _column_candidates(maxima, m)
        chunks = below.gather(0, maxima.gather(0, below).topk(m, dim=0, sorted=False).indices)
    else:
        chunks = maxima.topk(m, dim=0, sorted=False).indices  # [m, F]
    offsets = torch.arange(c, device=matrix.device).view(1, c, 1)
    return (chunks.unsqueeze(1) * c + offsets).reshape(m * c, n_cols)


def top_entries(matrix: Tensor, n: int) -> Tensor:
    """Flat indices (ascending) of the n largest entries of a [B, F] matrix, without a top-n over all B*F.

    The n-th largest value among each row's top m = 2n/B entries has at least n entries at or above
    it, so it bounds the matrix's n-th largest from below: only entries at or above it are candidates
    (usually few more than n), and an exact top-n among them is the answer. Ties at the boundary may
    pick a different but equal-valued entry than a full top-n would.
    """
    n_rows, n_cols = matrix.shape
    if n >= matrix.numel():
        return torch.arange(matrix.numel(), device=matrix.device)
    m = min(n_cols, 2 * math.ceil(n / n_rows))
    bound = matrix.topk(m, dim=1, sorted=False).values.flatten().topk(n, sorted=False).values.min()
    candidates = (matrix >= bound).flatten().nonzero().squeeze(1)
    if candidates.numel() == n:
        return candidates
    best = matrix.flatten()[candidates].topk(n, sorted=False).indices
    return candidates[best].sort().values
