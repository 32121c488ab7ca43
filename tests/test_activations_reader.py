"""Reading the cache: the mixing buffer, shuffled batches, (acts, grads) alignment, contexts and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import BOS_ID, write_cache

from activations.cache import CacheConfig, build_cache
from activations.format import CacheError
from activations.reader import load_cache
from activations.shuffle import mixing_buffer

HOOKS = ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]  # widths 32 and 64


# -- mixing_buffer ------------------------------------------------------------------------------


def id_chunks(sizes: list[int]) -> list[torch.Tensor]:
    """Chunks whose rows are their own ids (twice, to check that rows move as a whole)."""
    out, start = [], 0
    for size in sizes:
        ids = torch.arange(start, start + size, dtype=torch.float32)
        out.append(torch.stack([ids, -ids], dim=1))
        start += size
    return out


SIZES = [7, 30, 1, 0, 64, 13, 50, 5]  # 170 rows in uneven chunks, one of them empty


def ids_of(batches: list[torch.Tensor]) -> list[int]:
    rows = torch.cat(batches)
    assert torch.equal(rows[:, 1], -rows[:, 0])
    return rows[:, 0].long().tolist()


def test_mixing_buffer_yields_every_row_once():
    batches = list(mixing_buffer(id_chunks(SIZES), 16, 40, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [16] * 10 + [10]
    ids = ids_of(batches)
    assert sorted(ids) == list(range(170))
    assert ids != list(range(170))  # mixed
    # Bounded memory: the first batch comes from the first 40 rows held (a 40-row buffer fills first).
    assert max(ids[:16]) < 7 + 30 + 1 + 64


def test_mixing_buffer_without_generator_keeps_order():
    batches = list(mixing_buffer(id_chunks(SIZES), 16, 40, None))
    assert [len(b) for b in batches] == [16] * 10 + [10]
    assert ids_of(batches) == list(range(170))


def test_mixing_buffer_seeded():
    run = lambda seed: ids_of(list(mixing_buffer(id_chunks(SIZES), 8, 32, torch.Generator().manual_seed(seed))))
    assert run(3) == run(3)
    assert run(3) != run(4)
    assert sorted(run(4)) == list(range(170))


def test_mixing_buffer_smaller_than_batch():
    # The buffer is raised to two batches, so a tiny buffer still yields full batches.
    batches = list(mixing_buffer(id_chunks([9, 9, 9, 9, 9]), 10, 3, torch.Generator().manual_seed(1)))
    assert [len(b) for b in batches] == [10, 10, 10, 10, 5]
    assert sorted(ids_of(batches)) == list(range(45))


def test_mixing_buffer_single_short_input():
    batches = list(mixing_buffer(id_chunks([5]), 8, 100, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [5]
    assert sorted(ids_of(batches)) == [0, 1, 2, 3, 4]


def test_mixing_buffer_empty_input():
    assert list(mixing_buffer([], 8, 64, torch.Generator().manual_seed(0))) == []
    assert list(mixing_buffer(id_chunks([0, 0]), 8, 64, None)) == []


def test_mixing_buffer_rejects_bad_batch_size():
    with pytest.raises(ValueError, match=r"^batch_size must be positive; got 0$"):
        list(mixing_buffer(id_chunks([4]), 0, 8, None))


# -- a multi-shard cache with gradients ----------------------------------------------------------


@pytest.fixture(scope="module")
def grads_cache(tmp_path_factory, tiny_model, corpus_txt):
    """16 contexts of 32 tokens in 4 shards of 4 contexts, two hooks, acts and grads."""
    import datasets

    out = tmp_path_factory.mktemp("reader") / "cache"
    cfg = CacheConfig(
        model="tiny-test-model",
        hooks=list(HOOKS),
        out=str(out),
        corpus=str(corpus_txt),
        tokens=16 * 32,
        context=32,
        batch_size=4,
        shard_contexts=4,
        with_grads=True,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", out.parent / "hf-datasets")
        build_cache(cfg, model=tiny_model, progress=False)
    cache = load_cache(out)
    assert cache.manifest["n_shards"] == 4
    return cache


def row_lookup(acts: torch.Tensor, grads: torch.Tensor) -> dict[tuple, int]:
    """Map an (activation, gradient) row pair to its cache index.

    Activations alone repeat (two contexts that open with the same characters share their first rows),
    but the gradient also depends on the tokens that follow, so pairs are unique; a batch row whose
    gradient was paired with the wrong activation is found nowhere.
    """
    table = {tuple(a.tolist()) + tuple(g.tolist()): i for i, (a, g) in enumerate(zip(acts, grads, strict=True))}
    assert len(table) == len(acts)
    return table


def test_cache_properties(grads_cache):
    tokens = np.load(grads_cache.path / "tokens.npy")
    assert grads_cache.hooks == HOOKS and grads_cache.d_in == 32 and grads_cache.has_grads
    assert grads_cache.n_tokens == int((tokens != BOS_ID).sum())
    assert grads_cache.dtype == "float32" and grads_cache.model == "tiny-test-model"
    np.testing.assert_array_equal(grads_cache.tokens, tokens)
    assert repr(grads_cache).startswith(f"ActivationCache({str(grads_cache.path)!r}, model='tiny-test-model'")


def test_iter_batches_shuffled_covers_every_row_once_with_aligned_grads(grads_cache):
    n = grads_cache.n_tokens
    acts_all, grads_all = grads_cache.rows(0, n), grads_cache.rows(0, n, kind="grads")
    lookup = row_lookup(acts_all, grads_all)
    batches = list(grads_cache.iter_batches(48, shuffle=True, seed=0, buffer_rows=100))
    assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    assert [len(a) for a, _ in batches] == [48] * (n // 48) + ([n % 48] if n % 48 else [])
    seen = []
    for acts, grads in batches:
        assert acts.shape[1] == 32 and grads.shape == acts.shape and acts.dtype == grads.dtype == torch.float32
        index = [lookup[tuple(a.tolist()) + tuple(g.tolist())] for a, g in zip(acts, grads, strict=True)]
        seen += index  # a KeyError above means a gradient row got separated from its activation row
    assert sorted(seen) == list(range(n))
    assert seen != list(range(n))


def test_iter_batches_shuffles_shard_order(grads_cache):
    # With a buffer of 2 batches, the first batch comes from whichever shard is read first.
    n = grads_cache.n_tokens
    acts_all, grads_all = grads_cache.rows(0, n), grads_cache.rows(0, n, kind="grads")
    lookup = row_lookup(acts_all, grads_all)
    bounds = np.cumsum([s["rows"] for s in grads_cache.manifest["shards"]])
    first_shards = set()
    for seed in range(8):
        acts, grads = next(grads_cache.iter_batches(8, seed=seed, buffer_rows=16))
        rows = [lookup[tuple(a.tolist()) + tuple(g.tolist())] for a, g in zip(acts, grads, strict=True)]
        shards = set(np.searchsorted(bounds, rows, side="right").tolist())
        assert len(shards) == 1
        first_shards |= shards
    assert len(first_shards) >= 2


def test_iter_batches_in_order_without_shuffle(grads_cache):
    n = grads_cache.n_tokens
    batches = list(grads_cache.iter_batches(100, shuffle=False))
    assert torch.equal(torch.cat([a for a, _ in batches]), grads_cache.rows(0, n))
    assert torch.equal(torch.cat([g for _, g in batches]), grads_cache.rows(0, n, kind="grads"))


def test_iter_batches_seeded(grads_cache):
    first = torch.cat([a for a, _ in grads_cache.iter_batches(64, seed=7, buffer_rows=128)])
    again = torch.cat([a for a, _ in grads_cache.iter_batches(64, seed=7, buffer_rows=128)])
    other = torch.cat([a for a, _ in grads_cache.iter_batches(64, seed=8, buffer_rows=128)])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_iter_batches_second_hook(grads_cache):
    n = grads_cache.n_tokens
    acts_all = grads_cache.rows(0, n, hook=HOOKS[1])
    grads_all = grads_cache.rows(0, n, hook=HOOKS[1], kind="grads")
    assert acts_all.shape == (n, 64)
    lookup = row_lookup(acts_all, grads_all)
    seen = []
    for acts, grads in grads_cache.iter_batches(50, seed=1, hook=HOOKS[1], buffer_rows=64):
        assert acts.shape[1] == grads.shape[1] == 64
        seen += [lookup[tuple(a.tolist()) + tuple(g.tolist())] for a, g in zip(acts, grads, strict=True)]
    assert sorted(seen) == list(range(n))


def test_iter_batches_acts_only(grads_cache):
    batches = list(grads_cache.iter_batches(200, shuffle=False, with_grads=False))
    assert all(isinstance(b, torch.Tensor) and b.shape[1] == 32 for b in batches)
    assert torch.equal(torch.cat(batches), grads_cache.rows(0, grads_cache.n_tokens))


def test_unknown_hook(grads_cache):
    with pytest.raises(CacheError) as info:
        next(grads_cache.iter_batches(8, hook="blocks.0.hook_resid_post"))
    assert str(info.value) == f"hook 'blocks.0.hook_resid_post' is not in this cache; it holds {HOOKS}"


def test_rows_across_shard_boundaries(grads_cache):
    n = grads_cache.n_tokens
    everything = grads_cache.rows(0, n)
    first_shard = grads_cache.manifest["shards"][0]["rows"]
    torch.testing.assert_close(grads_cache.rows(first_shard - 3, first_shard + 5), everything[first_shard - 3 :][:8])
    assert grads_cache.rows(n, n + 10).shape == (0, 32)
    assert grads_cache.rows(n - 2, n + 10, hook=HOOKS[1]).shape == (2, 64)


def test_spread_rows_are_whole_contexts_evenly_spaced(tmp_path):
    """10 blocks of 10 unique rows (a cache without tokens: blocks of the context length stand for contexts)."""
    acts = torch.arange(100 * 3, dtype=torch.float32).reshape(100, 3)
    cache = load_cache(write_cache(tmp_path / "c", acts, shard_rows=9))  # "context" 10; shards of 9 rows
    rows, n_contexts = cache.spread_rows(40)
    assert n_contexts == 4 and torch.equal(rows, torch.cat([acts[0:10], acts[30:40], acts[60:70], acts[90:100]]))
    # Contexts starting at or after skip_rows; capped at n_rows (the last context cut short).
    rows, n_contexts = cache.spread_rows(15, skip_rows=35)
    assert n_contexts == 2 and torch.equal(rows, torch.cat([acts[40:50], acts[90:95]]))
    # No more rows than asked for left: all of them.
    rows, n_contexts = cache.spread_rows(1000, skip_rows=80)
    assert n_contexts == 2 and torch.equal(rows, acts[80:])
    with pytest.raises(ValueError, match="n_rows must be >= 1 and skip_rows >= 0, got 0 and 0"):
        cache.spread_rows(0)


def test_spread_rows_follow_the_contexts_of_the_tokens(grads_cache):
    """A cache with tokens: contexts are those of row_index (BOS-free rows of varying count)."""
    ctx = grads_cache.row_index[:, 0]
    everything = grads_cache.rows(0, grads_cache.n_tokens, hook=HOOKS[1])
    lengths = np.bincount(ctx)
    n_rows = int(2 * lengths.mean())  # two contexts' worth: the first and the last
    rows, n_contexts = grads_cache.spread_rows(n_rows, hook=HOOKS[1])
    expected = torch.cat([everything[torch.from_numpy(ctx == c)] for c in (0, 15)])[:n_rows]
    assert n_contexts == 2 and torch.equal(rows, expected)


def test_context_of_matches_row_index_and_activations(grads_cache, tiny_model):
    n = grads_cache.n_tokens
    tokens = np.load(grads_cache.path / "tokens.npy")
    assert grads_cache.row_index.shape == (n, 2)
    assert grads_cache.context_of(0)[1] == 1 and grads_cache.row_index[0].tolist() == [0, 1]
    last_ctx, last_pos = grads_cache.row_index[-1]
    assert last_ctx == 15 and last_pos == max(np.nonzero(tokens[15] != BOS_ID)[0])
    for row in [0, 1, 30, 31, 200, n // 2, n - 1]:
        context, pos = grads_cache.context_of(row)
        ctx = grads_cache.row_index[row][0]
        np.testing.assert_array_equal(context, tokens[ctx])
        assert pos == grads_cache.row_index[row][1] and context[pos] != BOS_ID
        # The row's activation is the model's activation at that position of that context.
        with torch.no_grad():
            _, act_cache = tiny_model.run_with_cache(torch.from_numpy(context[None].astype(np.int64)))
        torch.testing.assert_close(grads_cache.rows(row, row + 1)[0], act_cache[HOOKS[0]][0, pos], rtol=0, atol=1e-5)
    # Rows count the non-BOS positions of each context in order.
    for ctx in (0, 7, 15):
        in_context = np.nonzero(grads_cache.row_index[:, 0] == ctx)[0]
        assert grads_cache.row_index[in_context, 1].tolist() == np.nonzero(tokens[ctx] != BOS_ID)[0].tolist()


@pytest.mark.parametrize("row", [-1, "n"])
def test_context_of_out_of_range(grads_cache, row):
    n = grads_cache.n_tokens
    row = n if row == "n" else row
    with pytest.raises(IndexError) as info:
        grads_cache.context_of(row)
    assert str(info.value) == f"row {row} is out of range for a cache of {n} rows"


# -- caches that cannot be read -------------------------------------------------------------------


def test_cache_without_grads_refuses_grads(tmp_path, tiny_model, corpus_txt, datasets_tmp_cache):
    out = tmp_path / "c"
    cfg = CacheConfig(model="m", hooks=[HOOKS[0]], out=str(out), corpus=str(corpus_txt), tokens=64, context=32)
    build_cache(cfg, model=tiny_model, progress=False)
    cache = load_cache(out)
    assert not cache.has_grads
    assert all(isinstance(b, torch.Tensor) for b in cache.iter_batches(16))
    with pytest.raises(CacheError) as info:
        next(cache.iter_batches(16, with_grads=True))
    assert str(info.value) == f"{out} has no gradients: cache with `saewb cache --with-grads`"
    with pytest.raises(CacheError) as info:
        cache.rows(0, 4, kind="grads")
    assert str(info.value) == f"{out} has no grads: cache with `saewb cache --with-grads` to store gradients"


def test_incomplete_cache_is_refused(tmp_path, grads_cache):
    out = tmp_path / "partial"
    shutil.copytree(grads_cache.path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError) as info:
        load_cache(out)
    assert str(info.value) == f"{out} is incomplete (1/4 shards): rerun the same `saewb cache` command to finish it"


def test_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(CacheError) as info:
        load_cache(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} is not an activation cache (no manifest.json); create one with `saewb cache --out {tmp_path}`"
    )


def test_other_format_version_is_refused(tmp_path, grads_cache):
    out = tmp_path / "future"
    shutil.copytree(grads_cache.path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"has cache format 2; this version reads format 1$"):
        load_cache(out)


def test_truncated_shard_is_refused_even_unverified(tmp_path, grads_cache):
    out = tmp_path / "cut"
    shutil.copytree(grads_cache.path, out)
    shard = out / HOOKS[0] / "shard_00002.grads"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-4])
    cache = load_cache(out, verify=False)
    with pytest.raises(CacheError) as info:
        list(cache.iter_batches(32, shuffle=False))
    assert str(info.value) == f"shard {shard} has {size - 4} bytes, expected {size}: it is corrupted"


def test_only_one_hook_reads_that_hook_as_the_first(grads_cache):
    view = grads_cache.only(HOOKS[1])
    assert view.hooks == [HOOKS[1]] and view.d_in == 64 and grads_cache.hooks == HOOKS  # the cache is unchanged
    ours = next(view.iter_batches(16, seed=3))
    theirs = next(grads_cache.iter_batches(16, seed=3, hook=HOOKS[1]))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(CacheError, match="is not in this cache"):
        grads_cache.only("blocks.9.hook_resid_post")
