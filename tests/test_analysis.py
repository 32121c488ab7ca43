"""The analysis store against brute force: a full encode of every row, then sorts and counts."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from experiments.analysis.errors import AnalysisError
from experiments.analysis.pipeline import analyze
from experiments.analysis.stats import HIST_EDGES, quantile_edges, sample_keys
from experiments.analysis.store import AnalysisStore, StoreError
from experiments.cli.analyze import add_analyze_parser
from tests.conftest import N_FEATURES, N_SHARDS, SHARD_ROWS, make_cache, make_sae


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    acts, tokens = make_cache(root / "cache")
    model = make_sae(root / "sae-topk")
    (root / "sae-topk" / "train_log.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "dead_frac": d, "l0": 4.0, "fvu": 0.5}) for s, d in [(10, 0.5), (20, 0.25)])
    )
    (root / "sae-topk" / "eval.json").write_text(json.dumps({"l0": 4.0, "fvu": 0.3, "density": [0.1] * 32}))
    path = analyze(root / "sae-topk", root / "cache", out=root / "store", top_n=5, window=3, batch_size=50,
                   progress=False)
    with torch.no_grad():
        z = model.encode(acts)
    return {"root": root, "path": path, "z": z, "tokens": tokens, "store": AnalysisStore(root / "store")}


def test_top_contexts_match_brute_force(built):
    store, z = built["store"], built["z"]
    for f in range(N_FEATURES):
        card = store.feature("sae-topk", f)
        col = z[:, f]
        want = torch.argsort(col, descending=True, stable=True)[:5]
        want = [r for r in want.tolist() if col[r] > 0]
        assert [c["row"] for c in card["top_contexts"]] == want
        for c in card["top_contexts"]:
            assert c["value"] == pytest.approx(float(col[c["row"]]), abs=1e-4)
            assert c["acts"][c["centre"]] == pytest.approx(c["value"], abs=1e-4)


def test_context_window_tokens_and_activations(built):
    store, z, tokens = built["store"], built["z"], built["tokens"]
    card = store.feature("sae-topk", 3)
    c = card["top_contexts"][0]
    ctx, pos = divmod(c["row"], SHARD_ROWS)
    pos += 1  # the BOS sits at position 0 of every context
    lo = max(0, pos - 3)
    hi = min(SHARD_ROWS + 1, pos + 4)
    assert c["tokens"] == [f"<{t}>" for t in tokens[ctx, lo:hi]]  # no model: token ids as strings
    want = [0.0 if p == 0 else float(z[ctx * SHARD_ROWS + p - 1, 3]) for p in range(lo, hi)]
    assert c["acts"] == pytest.approx(want, abs=1e-4)


def test_density_mean_max_histogram(built):
    store, z = built["store"], built["z"]
    active = z > 0
    assert store.densities("sae-topk") == pytest.approx((active.double().mean(0)).numpy())
    for f in (0, 7, 31):
        card = store.feature("sae-topk", f)
        n = int(active[:, f].sum())
        assert sum(card["histogram"]) == n
        assert len(card["histogram"]) == len(HIST_EDGES) - 1
        assert card["max_act"] == pytest.approx(float(z[:, f].max()), abs=1e-5)
        if n:
            assert card["mean_act"] == pytest.approx(float(z[active[:, f], f].mean()), rel=1e-5)
            values = z[active[:, f], f].numpy()
            want = np.histogram(np.clip(values, HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0]
            assert card["histogram"] == want.tolist()
    dead = [f for f in range(N_FEATURES) if not active[:, f].any()]
    assert store.dead_features("sae-topk") == dead


def test_quantile_samples_are_real_activations(built):
    store, z = built["store"], built["z"]
    card = store.feature("sae-topk", 0)
    samples = [s for bucket in card["quantile_samples"] for s in bucket]
    assert 0 < len(samples) <= 4 * 3
    for s in samples:
        assert s["value"] == pytest.approx(float(z[s["row"], 0]), abs=1e-4) and s["value"] > 0
    flat = [s["value"] for s in samples]
    assert flat == sorted(flat)  # buckets run from low to high activations


def test_neighbours_training_log_and_summary(built):
    store = built["store"]
    model_w = torch.nn.functional.normalize(store_sae_weights(built["root"] / "sae-topk"), dim=1)
    cos = model_w @ model_w.T
    cos.fill_diagonal_(-2)
    card = store.feature("sae-topk", 2)
    assert [n[0] for n in card["neighbours"]] == torch.topk(cos[2], 10).indices.tolist()
    assert store.training_log("sae-topk") == [
        {"step": 10, "dead_frac": 0.5, "l0": 4.0, "fvu": 0.5}, {"step": 20, "dead_frac": 0.25, "l0": 4.0, "fvu": 0.5}
    ]
    (info,) = store.saes()
    assert (info["arch"], info["n_features"], info["k"], info["n_rows"]) == ("topk", 32, 4, SHARD_ROWS * N_SHARDS)
    assert info["metrics"]["fvu"] == 0.3 and "density" not in info["metrics"]
    assert card["logit_top"] is None  # no model given
    start = time.perf_counter()
    store.feature("sae-topk", 5)
    print(f"feature load: {(time.perf_counter() - start) * 1e3:.2f} ms")


def store_sae_weights(path):
    import sae

    return sae.load(path).W_dec.detach().float()


def test_second_sae_is_added_and_replaced(built, tmp_path):
    root = built["root"]
    store_dir = tmp_path / "store"
    analyze(root / "sae-topk", root / "cache", out=store_dir, top_n=2, progress=False)
    make_sae(tmp_path / "other", seed=1)
    analyze(tmp_path / "other", root / "cache", out=store_dir, top_n=2, progress=False)
    analyze(tmp_path / "other", root / "cache", out=store_dir, top_n=3, progress=False)
    store = AnalysisStore(store_dir)
    assert [s["name"] for s in store.saes()] == ["other", "sae-topk"]
    assert len(store.feature("sae-topk", 0)["top_contexts"]) <= 2
    assert len(store.feature("other", 0)["top_contexts"]) == 3
    assert list(store_dir.iterdir()) == [store_dir / "store.sqlite"]  # no temp files left behind


def test_logit_lens_and_token_strings_with_tiny_model(built, tiny_model, tmp_path):
    root = built["root"]
    analyze(root / "sae-topk", root / "cache", model=tiny_model, out=tmp_path, hook=None, top_n=3, progress=False)
    card = AnalysisStore(tmp_path).feature("sae-topk", 4)
    logits = store_sae_weights(root / "sae-topk")[4] @ tiny_model.W_U.float()
    want = torch.topk(logits, 10)
    assert [v for _, v in card["logit_top"]] == pytest.approx(want.values.tolist(), abs=1e-3)
    assert [t for t, _ in card["logit_top"]] == [tiny_model.tokenizer.decode([i]) for i in want.indices.tolist()]
    assert [v for _, v in card["logit_bottom"]] == pytest.approx(torch.topk(-logits, 10).values.neg().tolist(),
                                                                  abs=1e-3)
    tokens = card["top_contexts"][0]["tokens"]
    assert all(len(t) <= 5 for t in tokens) and not any(t.startswith("<") and t[1:-1].isdigit() for t in tokens)


def test_bad_inputs_are_value_errors(built, tmp_path):
    root = built["root"]
    with pytest.raises(AnalysisError, match="does not exist"):
        analyze(tmp_path / "missing", root / "cache", out=tmp_path / "s", progress=False)
    make_sae(tmp_path / "wide", d_in=16)
    with pytest.raises(AnalysisError, match="width 32 .* d_in=16"):
        analyze(tmp_path / "wide", root / "cache", out=tmp_path / "s", progress=False)
    with pytest.raises(AnalysisError, match="not an activation cache"):
        analyze(root / "sae-topk", tmp_path, out=tmp_path / "s", progress=False)
    with pytest.raises(AnalysisError, match="hook 'blocks.9.hook_z' is not in cache"):
        analyze(root / "sae-topk", root / "cache", hook="blocks.9.hook_z", out=tmp_path / "s", progress=False)
    assert issubclass(AnalysisError, ValueError)
    with pytest.raises(StoreError, match="saewb analyze"):
        AnalysisStore(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="out of range: sae-topk has features 0..31"):
        built["store"].feature("sae-topk", 32)


def test_search_finds_features_by_top_token(built):
    store = built["store"]
    card = store.feature("sae-topk", 1)
    token = card["top_contexts"][0]["tokens"][card["top_contexts"][0]["centre"]]
    hits = [f for f, _ in store.search("sae-topk", token)]
    assert 1 in hits
    assert store.search("sae-topk", "no-such-token") == []


def test_cli_parser_builds_a_store(built, tmp_path, capsys):
    import argparse


    parser = argparse.ArgumentParser(prog="saewb")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    root = built["root"]
    args = parser.parse_args(["analyze", "--sae", str(root / "sae-topk"), "--activations", str(root / "cache"),
                              "--out", str(tmp_path / "cli-store"), "--top-n", "2", "--quiet", "--name", "cli"])
    assert args.model == "auto"
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cannot load 'synthetic'" in out and f"saewb dashboard --store {tmp_path / 'cli-store'}" in out
    card = AnalysisStore(tmp_path / "cli-store").feature("cli", 0)
    assert len(card["top_contexts"]) <= 2 and card["logit_top"] is None


# ---- the single pass ------------------------------------------------------------------------------------


def brute_window(z: torch.Tensor, tokens: np.ndarray, row: int, feature: int, window: int) -> dict:
    """The context around `row` read straight off the full latents: the rows of context c are its positions 1..64."""
    ctx, pos = divmod(row, SHARD_ROWS)
    pos += 1
    lo, hi = max(0, pos - window), min(SHARD_ROWS + 1, pos + window + 1)
    return {"centre": pos - lo, "tokens": [f"<{t}>" for t in tokens[ctx, lo:hi]],
            "acts": [0.0 if p == 0 else float(z[ctx * SHARD_ROWS + p - 1, feature]) for p in range(lo, hi)]}


def test_cache_is_streamed_once(built, tmp_path, monkeypatch):
    from activations.reader import ActivationCache

    calls, rows = [], []
    original = ActivationCache.iter_batches

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("shuffle"))
        for batch in original(self, *args, **kwargs):
            rows.append(batch.shape[0])
            yield batch

    monkeypatch.setattr(ActivationCache, "iter_batches", counting)
    analyze(built["root"] / "sae-topk", built["root"] / "cache", out=tmp_path, top_n=5, window=3, batch_size=50,
            progress=False)
    assert calls == [False]  # one pass, in cache order
    assert rows == [50, 50, 50, 42]


@pytest.mark.parametrize("batch_size, window", [(1, 3), (5, 8)])
def test_windows_across_batch_boundaries_match_brute_force(built, tmp_path, batch_size, window):
    """Batches smaller than a window (and than its span) still give every context exactly."""
    z, tokens = built["z"], built["tokens"]
    analyze(built["root"] / "sae-topk", built["root"] / "cache", out=tmp_path, top_n=4, window=window,
            batch_size=batch_size, progress=False)
    store = AnalysisStore(tmp_path)
    n_checked = 0
    for f in range(N_FEATURES):
        card = store.feature("sae-topk", f)
        col = z[:, f]
        want = [r for r in torch.argsort(col, descending=True, stable=True)[:4].tolist() if col[r] > 0]
        assert [c["row"] for c in card["top_contexts"]] == want
        for c in card["top_contexts"] + [s for bucket in card["quantile_samples"] for s in bucket]:
            expected = brute_window(z, tokens, c["row"], f, window)
            assert (c["centre"], c["tokens"]) == (expected["centre"], expected["tokens"])
            assert c["acts"] == pytest.approx(expected["acts"], abs=1e-5)
            n_checked += 1
    assert n_checked > 200


def test_quantile_samples_are_the_largest_keys_of_each_bucket(built, tmp_path):
    """Every bucket holds exactly the min(5, population) rows with the largest keys, whatever the batch size."""

    z = built["z"]
    cards = {}
    for batch_size in (7, 50):
        out = tmp_path / str(batch_size)
        analyze(built["root"] / "sae-topk", built["root"] / "cache", out=out, top_n=2, window=2, n_quantiles=4,
                samples_per_quantile=5, batch_size=batch_size, seed=3, progress=False)
        cards[batch_size] = [AnalysisStore(out).feature("sae-topk", f) for f in range(N_FEATURES)]
    populations = []
    for f in range(N_FEATURES):
        rows = (z[:, f] > 0).nonzero()[:, 0]
        vals = z[rows, f]
        got = [[s["row"] for s in bucket] for bucket in cards[50][f]["quantile_samples"]]
        assert got == [[s["row"] for s in bucket] for bucket in cards[7][f]["quantile_samples"]]
        if rows.numel() == 0:
            assert got == []
            continue
        hist = torch.as_tensor(np.histogram(np.clip(vals.numpy(), HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0])
        edges = quantile_edges(hist[None], 4)[0]
        bucket = (vals[:, None] >= edges).sum(1)
        keys = sample_keys(rows, torch.full_like(rows, f), N_FEATURES, 3)
        for b in range(4):
            in_bucket = bucket == b
            populations.append(int(in_bucket.sum()))
            top = torch.argsort(keys[in_bucket], descending=True)[:5]
            want = rows[in_bucket][top]
            want = want[torch.argsort(z[want, f], stable=True)].tolist()  # a bucket's samples run by value
            assert got[b] == want
            assert len(got[b]) == min(5, populations[-1])
    assert min(populations) == 0 and any(0 < p < 5 for p in populations) and max(populations) > 5


def test_one_quantile_bucket_samples_the_whole_distribution_and_zero_is_refused(built, tmp_path):
    out = tmp_path / "one"
    analyze(built["root"] / "sae-topk", built["root"] / "cache", out=out, top_n=2, window=1, n_quantiles=1,
            samples_per_quantile=3, seed=0, progress=False)
    z = built["z"]
    for f in range(N_FEATURES):
        buckets = AnalysisStore(out).feature("sae-topk", f)["quantile_samples"]
        n_active = int((z[:, f] > 0).sum())
        assert len(buckets) == (1 if n_active else 0)
        if n_active:
            assert len(buckets[0]) == min(3, n_active)
    with pytest.raises(AnalysisError, match="n_quantiles >= 1"):
        analyze(built["root"] / "sae-topk", built["root"] / "cache", out=tmp_path / "zero", n_quantiles=0,
                progress=False)
