"""The sparse training kernels against the plain dense reference, in float64 on fresh random data.

Every run draws a new seed (printed in failure messages), so repeated CI runs keep exploring inputs.
Covered: k=1, k=F, rows with no latents, batches with many tied pre-activations, every trainable
architecture with AuxK and aux_zipf, and a few optimiser steps end to end.
"""

import random

import pytest
import torch

from sae.aux_losses import aux_reconstruction_loss, sparse_aux_loss
from sae.config import SAEConfig, TrainConfig
from sae.registry import TRAINABLE, get_architecture
from sae.sparse_code import (
    CHUNKED_TOPK_MIN_FEATURES,
    COLUMN_CHUNK,
    SparseCode,
    Support,
    _chunked_topk,
    column_topk,
    decode_sparse,
    gather_pre_acts,
    top_entries,
    topk_indices,
    topk_support,
)
from sae.training.streams import TensorStream
from sae.training.trainer import Trainer

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def seed():
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    return value


def _params(d: int, F: int, ties: bool):
    if ties:  # small integers: many exactly equal pre-activations
        W_enc = torch.randint(-2, 3, (d, F)).double()
        b_enc = torch.zeros(F, dtype=torch.float64)
    else:
        W_enc = torch.randn(d, F, dtype=torch.float64)
        b_enc = torch.randn(F, dtype=torch.float64)
    W_dec = torch.randn(F, d, dtype=torch.float64)
    return [t.requires_grad_() for t in (W_enc, b_enc, W_dec)]


def _inputs(B: int, d: int, ties: bool) -> torch.Tensor:
    x = torch.randint(-2, 3, (B, d)).double() if ties else torch.randn(B, d, dtype=torch.float64)
    return x.requires_grad_()


def _both_ways(x, W_enc, b_enc, W_dec, support: Support, target):
    """(loss, grads) of ||x_hat - target||^2 via the sparse kernels and via dense matrices."""
    inputs = (x, W_enc, b_enc, W_dec)
    with torch.no_grad():
        a = x @ W_enc + b_enc
    z = SparseCode(support, gather_pre_acts(x, W_enc, b_enc, a, support).relu())
    sparse_loss = (decode_sparse(z, W_dec) - target).pow(2).sum()
    sparse_grads = torch.autograd.grad(sparse_loss, inputs)
    mask = support.mask()
    dense_z = torch.where(mask, (x @ W_enc + b_enc).relu(), torch.zeros(()).double())
    dense_loss = (dense_z @ W_dec - target).pow(2).sum()
    dense_grads = torch.autograd.grad(dense_loss, inputs)
    return (sparse_loss, sparse_grads), (dense_loss, dense_grads)


def _assert_same(sparse, dense, seed, what=""):
    (s_loss, s_grads), (d_loss, d_grads) = sparse, dense
    assert torch.allclose(s_loss, d_loss, **TOL), f"loss differs{what} (seed {seed})"
    for name, gs, gd in zip(("x", "W_enc", "b_enc", "W_dec"), s_grads, d_grads, strict=True):
        assert gs.shape == gd.shape
        assert torch.allclose(gs, gd, **TOL), f"grad of {name} differs{what} (seed {seed})"


@pytest.mark.parametrize("k", [1, 5, 24])  # 24 == F: every latent selected
@pytest.mark.parametrize("ties", [False, True])
def test_topk_support_kernels_match_dense(seed, k, ties):
    B, d, F = 37, 6, 24
    W_enc, b_enc, W_dec = _params(d, F, ties)
    x = _inputs(B, d, ties)
    with torch.no_grad():
        support = topk_support(x @ W_enc + b_enc, k)
    assert support.per_row == k and support.nnz == B * k
    assert torch.equal(support.mask().sum(1), torch.full((B,), k))
    target = torch.randn(B, d, dtype=torch.float64)
    _assert_same(*_both_ways(x, W_enc, b_enc, W_dec, support, target), seed, f" (k={k}, ties={ties})")


def test_variable_support_with_empty_rows_matches_dense(seed):
    B, d, F = 29, 5, 40
    W_enc, b_enc, W_dec = _params(d, F, ties=False)
    x = _inputs(B, d, ties=False)
    mask = torch.rand(B, F) < 0.2
    mask[[0, 7, B - 1]] = False  # empty first, middle and last rows
    mask[3] = True  # one full row
    support = Support.from_mask(mask)
    assert torch.equal(support.mask(), mask)
    starts = support.row_starts()
    assert starts.shape == (B + 1,) and int(starts[-1]) == int(mask.sum())
    target = torch.randn(B, d, dtype=torch.float64)
    _assert_same(*_both_ways(x, W_enc, b_enc, W_dec, support, target), seed)
    z = SparseCode(support, torch.ones(support.nnz, dtype=torch.float64))
    assert torch.equal(decode_sparse(z, W_dec)[0], torch.zeros(d, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 7])
def test_the_b_pre_gradient_from_db_enc_matches_autograd_through_x_minus_b_pre(seed, k):
    """The training path passes x - b_pre without history and b_pre apart: its gradient -W_enc db_enc (no per-row
    gradient of x) equals autograd's through a = (x - b_pre) W_enc + b_enc (float64)."""
    B, d, F = 33, 6, 20
    W_enc, b_enc, W_dec = _params(d, F, ties=False)
    b_pre = torch.randn(d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, d, dtype=torch.float64)  # data: no gradient
    target = torch.randn(B, d, dtype=torch.float64)
    params = (W_enc, b_enc, W_dec, b_pre)
    with torch.no_grad():
        x_in = x - b_pre
        a = x_in @ W_enc + b_enc
        support = topk_support(a, k)
    z = SparseCode(support, gather_pre_acts(x_in, W_enc, b_enc, a, support, b_pre).relu())
    sparse = torch.autograd.grad((decode_sparse(z, W_dec) + b_pre - target).pow(2).sum(), params)
    dense_z = torch.where(support.mask(), ((x - b_pre) @ W_enc + b_enc).relu(), torch.zeros(()).double())
    dense = torch.autograd.grad((dense_z @ W_dec + b_pre - target).pow(2).sum(), params)
    for name, gs, gd in zip(("W_enc", "b_enc", "W_dec", "b_pre"), sparse, dense, strict=True):
        assert torch.allclose(gs, gd, **TOL), f"grad of {name} differs (seed {seed})"
    with pytest.raises(ValueError, match="without autograd history"):
        gather_pre_acts(x_in.requires_grad_(), W_enc, b_enc, a, support, b_pre)


@pytest.mark.parametrize(("n_cols", "k", "chunk"),
                         [(4096, 16, 8), (8192, 32, 16), (64, 4, 8), (48, 3, 4), (9216, 32, 8), (8192, 16, 8)])
@pytest.mark.parametrize("ties", [False, True])
def test_the_chunked_topk_selects_the_k_largest_of_every_row(seed, n_cols, k, chunk, ties):
    """The chunk-maxima top-k keeps exactly each row's k largest values (with ties: as many of the boundary value
    as torch.topk does), k distinct indices per row."""
    g = torch.Generator().manual_seed(seed)
    n_rows = 37
    scores = (torch.randint(-3, 4, (n_rows, n_cols), generator=g).float() if ties
              else torch.randn(n_rows, n_cols, generator=g))
    idx = _chunked_topk(scores, k, chunk)  # 9216 and 8192/8: the maxima's top-k is chunked too (1152, 1024 wide)
    assert idx.shape == (n_rows, k) and int(idx.min()) >= 0 and int(idx.max()) < n_cols
    assert all(len(set(row)) == k for row in idx.tolist())
    expected = scores.topk(k, dim=-1).values
    assert torch.equal(scores.gather(1, idx).sort(dim=1, descending=True).values, expected), f"seed {seed}"


def test_topk_indices_takes_the_chunked_path_only_on_wide_cpu_matrices(monkeypatch):
    calls = []
    import sae.sparse_code as sc

    monkeypatch.setattr(sc, "_chunked_topk", lambda s, k, c: calls.append((s.shape[1], k, c)) or s.topk(k).indices)
    topk_indices(torch.randn(4, CHUNKED_TOPK_MIN_FEATURES), 16)
    topk_indices(torch.randn(4, 2 * CHUNKED_TOPK_MIN_FEATURES), 16)  # F/k = 512: chunks of 16
    topk_indices(torch.randn(4, CHUNKED_TOPK_MIN_FEATURES // 2), 16)  # narrow: torch.topk
    topk_indices(torch.randn(4, CHUNKED_TOPK_MIN_FEATURES), 512)  # k * chunk too large a share: torch.topk
    assert calls == [(CHUNKED_TOPK_MIN_FEATURES, 16, 8), (2 * CHUNKED_TOPK_MIN_FEATURES, 16, 16)]


def test_the_chunk_maxima_top_k_is_chunked_again_when_there_are_at_least_1024_maxima(monkeypatch):
    import sae.sparse_code as sc

    calls, original = [], sc._chunked_topk
    monkeypatch.setattr(sc, "_chunked_topk", lambda s, k, c: calls.append((s.shape[1], k, c)) or original(s, k, c))
    scores = torch.randn(5, 9216)
    idx = sc._chunked_topk(scores, 32, 8)
    assert calls == [(9216, 32, 8), (1152, 32, 8)]  # 1152 maxima -> 144: too few for another level
    assert torch.equal(scores.gather(1, idx).sort(dim=1).values, scores.topk(32).values.sort(dim=1).values)
    calls.clear()
    sc._chunked_topk(torch.randn(5, 4096), 16, 8)  # 512 maxima: torch.topk
    assert calls == [(4096, 16, 8)]


@pytest.mark.parametrize(("n_rows", "m"), [(4096, 15), (512, 32), (512, 8), (256, 16), (300, 4), (100, 5), (64, 64)])
@pytest.mark.parametrize("ties", [False, True])
def test_column_topk_gives_every_columns_m_largest_largest_first(seed, n_rows, m, ties):
    """As torch.topk(m, dim=0, sorted=True): the same values in the same order, indices that point at them, m
    distinct rows per column; without ties the same indices. 4096 rows: the chunk maxima (512) are chunked again;
    512: one level; 256 with m=16: 2*8*m = 256, the boundary; 300, 100, 64: torch.topk itself."""
    g = torch.Generator().manual_seed(seed)
    n_cols = 37
    matrix = (torch.randint(-3, 4, (n_rows, n_cols), generator=g).float() if ties
              else torch.randn(n_rows, n_cols, generator=g, dtype=torch.float64))
    values, rows = column_topk(matrix, m)
    expected = matrix.topk(m, dim=0, sorted=True)
    assert values.shape == rows.shape == (m, n_cols)
    assert torch.equal(values, expected.values), f"seed {seed}"
    assert torch.equal(matrix.gather(0, rows), values)
    assert all(len(set(col)) == m for col in rows.t().tolist())
    if not ties:
        assert torch.equal(rows, expected.indices), f"seed {seed}"


def test_column_topk_chunks_tall_contiguous_cpu_matrices_and_leaves_the_rest_to_torch(monkeypatch):
    import sae.sparse_code as sc

    calls, original = [], sc._column_candidates
    monkeypatch.setattr(sc, "_column_candidates", lambda a, m: calls.append(tuple(a.shape)) or original(a, m))
    matrix = torch.randn(4096, 10)
    column_topk(matrix, 15)
    assert calls == [(4096, 10), (4096 // COLUMN_CHUNK, 10)]  # 512 maxima chunked again; their 64 maxima are not
    calls.clear()
    values, rows = column_topk(matrix.t().contiguous().t(), 15)  # not contiguous: torch.topk
    column_topk(matrix, 300)  # 2*8*300 > 4096 rows: torch.topk
    assert calls == [] and torch.equal(values, matrix.topk(15, dim=0).values)


def _plain_feature_choice_support(model, pre_acts: torch.Tensor) -> Support:
    """FC's selection as it was first written: one top-m_max down every column, the first m_i kept."""
    n_rows, n_features = pre_acts.shape
    m = model.capacities(n_rows)
    top = pre_acts.topk(int(m.max()), dim=0, sorted=True).indices
    ranks, cols = (torch.arange(top.shape[0]).unsqueeze(1) < m.unsqueeze(0)).nonzero(as_tuple=True)
    return Support.from_pairs(top[ranks, cols], cols, n_rows, n_features)


def _entries(support: Support) -> list[int]:
    return sorted((support.rows * support.n_features + support.cols).tolist())


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_selects_the_same_entries_as_one_plain_top_m_down_every_column(seed, capacity):
    """FC's training selection through runs of demand ranks and column_topk equals the plain one (B=512: the
    chunked path; Zipf: several runs, copied-out columns and the whole-matrix tail; tie-free float64 values, a
    random demand order)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(arch="feature_choice", d_in=8, n_features=64, k=4, fc_capacity=capacity)
    model = get_architecture("feature_choice")(cfg, seed=3).double()
    model.demand_ema.copy_(torch.rand(64, generator=g, dtype=torch.float64))
    pre_acts = torch.randn(512, 64, generator=g, dtype=torch.float64)
    runs = model.rank_runs(512)
    assert (len(runs) == 1) == (capacity == "uniform")
    support, _ = model.select_train(pre_acts, None)
    assert support.nnz == 4 * 512 and _entries(support) == _entries(_plain_feature_choice_support(model, pre_acts))


def test_rank_runs_cover_every_rank_once_with_their_largest_capacity_and_their_sum():
    from sae.architectures.feature_choice import rank_runs

    by_rank = [64, 40, 33, 20, 17, 9, 8, 7, 8, 6, 5, 3]  # not monotone, as largest-remainder rounding allows
    runs = rank_runs(by_rank)  # the tail: m <= ceil(220 / 12) = 19
    assert [(r0, r1) for r0, r1, _, _ in runs] == [(0, 3), (3, 4), (4, 12)]  # (32, 64], (16, 32], the tail
    assert [(m, total) for _, _, m, total in runs] == [(64, 137), (20, 20), (17, 63)]
    assert rank_runs([7] * 5 + [6] * 4) == [(0, 9, 7, 59)]  # uniform: one run


def test_support_from_pairs_sorts_rows_into_csr_order():
    rows, cols = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([1, 3, 0, 2, 1])
    s = Support.from_pairs(rows, cols, n_rows=4, n_features=4)
    assert s.rows.tolist() == [0, 0, 1, 2, 2] and s.cols.tolist() == [1, 3, 2, 0, 1]
    assert s.row_starts().tolist() == [0, 2, 3, 5, 5]  # the last row is empty
    dense = s.to_dense(torch.arange(1.0, 6.0))
    assert dense[0, 1].item() == 1 and dense[2, 0].item() == 4 and dense.sum().item() == 15


@pytest.mark.parametrize("excluded", [False, True])
@pytest.mark.parametrize("weights_kind", ["dead", "zipf", "none", "all"])
def test_sparse_aux_loss_matches_dense_reference(seed, weights_kind, excluded):
    B, d, F, k_aux = 33, 6, 30, 7
    W_enc, b_enc, W_dec = _params(d, F, ties=False)
    x = _inputs(B, d, ties=False)
    weights = {
        "dead": (torch.rand(F) < 0.3).double(),
        "zipf": torch.rand(F, dtype=torch.float64) * (torch.rand(F) < 0.6),
        "none": torch.zeros(F, dtype=torch.float64),
        "all": torch.ones(F, dtype=torch.float64),
    }[weights_kind]
    residual = torch.randn(B, d, dtype=torch.float64)
    with torch.no_grad():
        a = x @ W_enc + b_enc
    # the main code's support (each token's own latents, which the aux loss must skip): a random mask
    # dense enough that some tokens keep fewer than k_aux other candidates
    exclude = Support.from_mask(torch.rand(B, F) < 0.7) if excluded else None
    sparse = sparse_aux_loss(x, W_enc, b_enc, a, residual, W_dec, weights, k_aux, exclude=exclude)
    dense = aux_reconstruction_loss(x @ W_enc + b_enc, residual, W_dec, weights, k_aux, exclude=exclude)
    assert torch.allclose(sparse, dense, **TOL), f"seed {seed}"
    if weights_kind == "none":
        assert sparse.item() == 0.0
        return
    inputs = (x, W_enc, b_enc, W_dec)
    for gs, gd in zip(torch.autograd.grad(sparse, inputs), torch.autograd.grad(dense, inputs), strict=True):
        assert torch.allclose(gs, gd, **TOL), f"seed {seed}"


def _trainer(arch: str, data: torch.Tensor, lm_grads: torch.Tensor, sparse: bool, aux_loss: str | None) -> Trainer:
    F, k, B = 48, 4, 32
    cfg = SAEConfig(arch=arch, d_in=data.shape[1], n_features=F, k=k, threshold_start_step=0)
    sae = get_architecture(arch)(cfg, seed=3).double()
    grads = lm_grads if sae.needs_grads else None
    stream = TensorStream(data, grads, B, shuffle=True, seed=1)
    train_cfg = TrainConfig(
        batch_size=B, total_tokens=data.shape[0], aux_loss=aux_loss, dead_tokens=B, progress=False,
        sparse_kernels=sparse, warmup_steps=0, k_aux=6,
    )
    return Trainer(sae, stream, train_cfg)


@pytest.mark.parametrize("arch", TRAINABLE)
@pytest.mark.parametrize("aux_loss", ["auxk", "aux_zipf"])
def test_training_steps_sparse_equal_dense_reference(seed, arch, aux_loss):
    """Same loss, gradients, and after 6 Adam steps the same weights, thresholds and dead counts."""
    data = torch.randn(6 * 32, 8, dtype=torch.float64) * torch.rand(8, dtype=torch.float64) * 3
    lm_grads = torch.randn_like(data)
    runs = {sparse: _trainer(arch, data, lm_grads, sparse, aux_loss) for sparse in (True, False)}
    for trainer in runs.values():
        trainer.initialize()
    # Force some dead latents so the aux loss is exercised from the first step.
    for trainer in runs.values():
        trainer.tracker.tokens_since_fired[::3] = 10**6
    x, g = next(runs[True].stream.batches(0))
    for trainer in runs.values():
        trainer.sae.zero_grad()
        x_n, g_n, _ = trainer.sae.normalize(x, g)
        rec, aux, _, _ = trainer.losses(x_n, g_n)
        (rec + aux).backward()
    (sparse_sae, dense_sae) = runs[True].sae, runs[False].sae
    for name, p in sparse_sae.named_parameters():
        q = dict(dense_sae.named_parameters())[name]
        assert torch.allclose(p.grad, q.grad, **TOL), f"{arch}/{aux_loss}: grad {name} (seed {seed})"
    metrics = {sparse: trainer.run() and trainer for sparse, trainer in runs.items()}
    state_s, state_d = metrics[True].sae.state_dict(), metrics[False].sae.state_dict()
    for name, value in state_s.items():
        if value.is_floating_point():
            assert torch.allclose(value, state_d[name], rtol=1e-8, atol=1e-10), f"{arch}/{aux_loss}: {name}"
        else:
            assert torch.equal(value, state_d[name]), f"{arch}/{aux_loss}: {name}"
    assert torch.equal(runs[True].tracker.tokens_since_fired, runs[False].tracker.tokens_since_fired)


def test_tracker_counts_only_firing_support_entries():
    from sae.training.tracking import FeatureTracker

    tracker = FeatureTracker(n_features=4, dead_tokens=3, fire_threshold=0.5, ema_beta=0.0)
    support = Support.from_mask(torch.tensor([[True, True, False, False], [True, False, True, False]]))
    tracker.update(SparseCode(support, torch.tensor([1.0, 0.2, 0.9, 0.5])))
    # latent 0 fired twice, latent 1 at 0.2 and latent 2 at exactly 0.5 are not above the threshold
    assert tracker.density_ema.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert tracker.tokens_since_fired.tolist() == [0, 2, 2, 2]
    tracker.update(SparseCode(support, torch.zeros(4)))
    assert tracker.dead_mask().tolist() == [False, True, True, True]


@pytest.mark.parametrize("shape,n", [((50, 40), 100), ((7, 300), 21), ((30, 8), 240), ((30, 8), 239), ((5, 5), 1)])
@pytest.mark.parametrize("kind", ["random", "ties", "one_row_dominates"])
def test_top_entries_equals_a_full_top_n(seed, shape, n, kind):
    matrix = torch.randn(*shape, dtype=torch.float64)
    if kind == "ties":
        matrix = matrix.round()
    if kind == "one_row_dominates":  # the per-row bound must still find every large entry
        matrix[3 % shape[0]] += 100
    got = top_entries(matrix, n)
    assert got.numel() == n and torch.equal(got, got.sort().values) and got.unique().numel() == n
    expected = matrix.flatten().topk(n).values
    assert torch.equal(matrix.flatten()[got].sort(descending=True).values, expected), f"seed {seed}"


def test_prefetch_keeps_order_reraises_and_leaves_no_thread():
    import threading

    from sae.training.prefetch import batch_reader, prefetch

    with prefetch(iter(range(50)), depth=3) as items:
        assert list(items) == list(range(50))

    def failing():
        yield 1
        raise ValueError("disk on fire")

    with prefetch(failing(), depth=2) as items, pytest.raises(ValueError, match="disk on fire"):
        list(items)

    class CountingStream:
        def __init__(self):
            self.made, self.closed = 0, False

        def batches(self, start=0):
            try:
                for i in range(start, 10**6):
                    self.made += 1
                    yield i
            finally:
                self.closed = True

    stream = CountingStream()
    with batch_reader(stream, start=5, stop=12, depth=2) as batches:
        assert list(batches) == [(step, step) for step in range(5, 12)]
    assert stream.made <= 7 + 1 and stream.closed  # nothing read past the end; the generator was closed
    assert not [t for t in threading.enumerate() if t.name == "saewb-prefetch"]
