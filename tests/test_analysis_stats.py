"""Streaming feature statistics (experiments/analysis/stats.py) on hand-made latents: margins, bins, top rows."""

from __future__ import annotations

import torch

from experiments.analysis.stats import HIST_EDGES, _bin_of, quantile_edges, stream_features, with_margins


def test_with_margins_blocks_are_the_padded_latents():

    z = torch.arange(23 * 2, dtype=torch.float32).view(23, 2) + 1
    padded = torch.cat([torch.zeros(4, 2), z, torch.zeros(4, 2)])
    batches = [z[:3], z[3:4], z[4:6], z[6:17], z[17:18], z[18:]]  # some smaller than the margin of 4
    blocks = list(with_margins(iter(batches), 4))
    starts = [start for start, _ in blocks]
    ends = [start + block.shape[0] - 8 for start, block in blocks]
    assert starts[0] == 0 and ends[-1] == 23 and starts[1:] == ends[:-1]
    for start, block in blocks:
        assert torch.equal(block, padded[start : start + block.shape[0]])
    assert [s for s, _ in with_margins(iter(batches), 0)] == [0, 3, 4, 6, 17, 18]


def test_fine_bins_never_straddle_a_quantile_edge():
    """Why per-fine-bin reservoirs suffice: `value >= edge` is constant over each bin of `_bin_of(overflow_bin)`."""

    gen = torch.Generator().manual_seed(0)
    hists = torch.randint(0, 5, (200, len(HIST_EDGES) - 1), generator=gen) * (torch.rand(200, 48, generator=gen) < 0.2)
    hists[0, -1] = 7  # all mass in the top bin: its quantile edges are the top edge 1e4
    hists[1, 0] = 7  # all mass in the bottom bin
    edges32 = torch.as_tensor(HIST_EDGES, dtype=torch.float32)
    values = torch.cat([edges32, edges32.nextafter(torch.tensor(0.0)), edges32.nextafter(torch.tensor(1e9)),
                        torch.tensor([1e-7, 3e-5, 2e4, 1e6]), torch.logspace(-5, 5, 997)])
    for n_buckets in (2, 4, 5):
        edges = quantile_edges(hists, n_buckets)  # [200, n_buckets - 1]
        assert torch.isin(edges, edges32[1:]).all()
        by_value = (values[None, :, None] >= edges[:, None, :]).sum(2)
        by_bin = (edges32[_bin_of(values, overflow_bin=True)][None, :, None] >= edges[:, None, :]).sum(2)
        assert torch.equal(by_value, by_bin)
    assert _bin_of(torch.tensor([2e4]), overflow_bin=True).item() == len(HIST_EDGES) - 1


def test_top_rows_and_windows_whatever_the_batching():
    """Ties go to the earliest rows (as a stable sort) and every kept window is the padded latents around its row."""

    z = torch.randint(0, 4, (300, 6), generator=torch.Generator().manual_seed(0)).float()  # values 0..3: many ties
    padded = torch.cat([torch.zeros(2, 6), z, torch.zeros(2, 6)])
    for batch_size in (1, 7, 300):
        stats, reservoirs = stream_features(with_margins(iter(z.split(batch_size)), 2), 6, 5, 2, 2, 0)
        for f in range(6):
            assert stats.top_rows[f].tolist() == torch.argsort(z[:, f], descending=True, stable=True)[:5].tolist()
            for n, r in enumerate(stats.top_rows[f].tolist()):
                assert torch.equal(stats.top_windows[f, n], padded[r : r + 5, f])
        feats = reservoirs.group // len(HIST_EDGES)
        for i, (f, r) in enumerate(zip(feats.tolist(), reservoirs.row.tolist(), strict=True)):
            assert torch.equal(reservoirs.windows[i], padded[r : r + 5, f])
        assert reservoirs.row.numel() == 6 * 3 * 2  # 6 features, values 1, 2, 3 in three bins, 2 rows each
