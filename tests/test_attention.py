"""Attention-output SAEs (experiments/attention.py): head attribution, direct feature attribution, their pages."""

import numpy as np
import pytest
import torch

import sae
from experiments.analysis.pipeline import analyze
from experiments.analysis.store import AnalysisStore
from experiments.attention import HeadViewError, check_hook_z, head_attribution, head_dfa, one_head_features
from tests.conftest import N_FEATURES, SHARD_ROWS, make_cache, make_sae, page, write_cache

HOOK_Z = "blocks.0.attn.hook_z"  # the tiny model: 4 heads of 8


def test_head_attribution_is_each_heads_share_of_the_decoder_norm():
    w_dec = torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0, 5.0],  # head norms 5, 0, 5
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # all in head 0
    shares = head_attribution(w_dec, 3)
    assert torch.allclose(shares, torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(shares.sum(1), torch.ones(2, dtype=torch.float64))
    assert one_head_features(shares) == 1 and one_head_features(shares, threshold=0.5) == 2
    with pytest.raises(HeadViewError, match="width 6 does not split into 4 heads"):
        head_attribution(w_dec, 4)


@pytest.mark.parametrize("normalization", ["scalar", "per_token_standardize", "none"])
def test_head_terms_sum_exactly_to_the_pre_activation(normalization):
    model = sae.get_architecture("topk")(sae.SAEConfig(arch="topk", d_in=32, n_features=16, k=4,
                                                       normalization=normalization), seed=3).double()
    model.norm_scale.fill_(0.7)
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
    z = torch.randn(10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = model.pre_acts(model.normalize(z)[0])[:, 5]
    terms, bias = head_dfa(model, z, 5, n_heads=4)
    assert terms.shape == (10, 4)
    assert torch.allclose(terms.sum(1) + bias, expected, rtol=0, atol=1e-12)


def test_head_views_of_an_sae_on_another_hook_are_one_clear_message():
    with pytest.raises(HeadViewError, match="needs an SAE trained on an attention output .* reads blocks.6.hook_resid"):
        check_hook_z("blocks.6.hook_resid_post")
    check_hook_z(HOOK_Z)


@pytest.fixture(scope="module")
def z_store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("heads")
    acts = torch.randn(SHARD_ROWS * 3, 32, generator=torch.Generator().manual_seed(0))
    write_cache(root / "cache", acts, shard_rows=SHARD_ROWS, hook=HOOK_Z)
    tokens = np.random.default_rng(0).integers(4, 102, size=(3, SHARD_ROWS + 1)).astype(np.int32)
    tokens[:, 0] = 0  # BOS, as write_cache's manifest says
    np.save(root / "cache" / "tokens.npy", tokens)
    model = sae.get_architecture("topk")(sae.SAEConfig(arch="topk", d_in=32, n_features=N_FEATURES, k=4,
                                                       normalization="none"), seed=0)
    model.metadata = {"hook_name": HOOK_Z, "model_name": "synthetic"}
    model.save(root / "zsae")
    analyze(root / "zsae", root / "cache", model=tiny_model, out=root / "store", top_n=4, window=2, progress=False)
    return root, model


def test_analyze_stores_head_shares_and_the_one_head_count(z_store):
    root, model = z_store
    store = AnalysisStore(root / "store")
    expected = head_attribution(model.W_dec, 4)
    for f in (0, 7, N_FEATURES - 1):
        assert store.head_shares("zsae", f) == pytest.approx(expected[f].tolist(), abs=1e-5)
    metrics = store.sae("zsae")["metrics"]
    assert metrics["n_heads"] == 4 and metrics["one_head_features"] == one_head_features(expected)


def test_feature_page_shows_heads_and_exact_dfa_on_the_top_contexts(z_store, monkeypatch):
    root, model = z_store
    monkeypatch.setenv("SAEWB_STORE", str(root / "store"))
    at = page("features").run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == 2  # the activation histogram and the head bars
    at.button(key="head_dfa").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[-2].value  # DFA per top context (the last table is the neighbours)
    card = AnalysisStore(root / "store").feature("zsae", 0)
    assert list(table["context"]) == list(range(len(card["top_contexts"])))
    heads = table[[f"H{h}" for h in range(4)]].sum(axis=1)
    assert list(table["pre-activation"]) == pytest.approx(list(heads), abs=1e-3)
    # the top contexts' values are their activations, i.e. the pre-activations the DFA terms add up to
    assert list(table["pre-activation"]) == pytest.approx([c["value"] for c in card["top_contexts"]], abs=1e-3)


def test_an_sae_on_another_hook_has_no_head_views(tmp_path):
    make_cache(tmp_path / "cache")
    make_sae(tmp_path / "sae")
    analyze(tmp_path / "sae", tmp_path / "cache", out=tmp_path / "store", top_n=4, window=2, progress=False)
    assert AnalysisStore(tmp_path / "store").head_shares("sae", 0) is None
