"""Attention-output SAEs (experiments/attention.py): head attribution, direct feature attribution, their pages."""

import numpy as np
import pytest
import torch

import sae
from activations import load_cache
from dashboard import data
from experiments.analysis.pipeline import analyze
from experiments.analysis.store import AnalysisStore
from experiments.attention import (
    HeadViewError,
    attention_inputs,
    check_hook_z,
    head_attribution,
    head_dfa,
    one_head_features,
    source_dfa,
)
from tests.conftest import N_FEATURES, SHARD_ROWS, make_cache, make_sae, make_tiny_model, page, write_cache

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


def float64_sae(normalization: str):
    """A float64 TopK SAE on 4 heads of 8 with a non-trivial scale and biases."""
    model = sae.get_architecture("topk")(sae.SAEConfig(arch="topk", d_in=32, n_features=16, k=4,
                                                       normalization=normalization), seed=3).double()
    model.norm_scale.fill_(0.7)
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
    return model


@pytest.mark.parametrize("normalization", ["scalar", "per_token_standardize", "none"])
def test_head_terms_sum_exactly_to_the_pre_activation(normalization):
    model = float64_sae(normalization)
    z = torch.randn(10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = model.pre_acts(model.normalize(z)[0])[:, 5]
    terms, bias = head_dfa(model, z, 5, n_heads=4)
    assert terms.shape == (10, 4)
    assert torch.allclose(terms.sum(1) + bias, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalization", ["scalar", "none"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_source_terms_sum_exactly_to_the_pre_activation(normalization, kv_heads):
    """DFA by source position (Kissane): z[h] = Σ_j pattern[h, j] v[j, h]; the terms over heads and sources, the
    -b_pre share of each head and b_enc add up to the pre-activation (float64), grouped-query values included."""
    model = float64_sae(normalization)
    gen = torch.Generator().manual_seed(2)
    pattern = torch.rand(4, 6, generator=gen, dtype=torch.float64).softmax(-1)
    v = torch.randn(6, kv_heads, 8, generator=gen, dtype=torch.float64)
    z = torch.einsum("hj,jhd->hd", pattern, v.repeat_interleave(4 // kv_heads, dim=1)).reshape(1, 32)
    expected = model.pre_acts(model.normalize(z)[0])[0, 7]
    terms, offsets, b_enc = source_dfa(model, pattern, v, 7)
    assert terms.shape == (4, 6) and offsets.shape == (4,)
    assert float(terms.sum() + offsets.sum() + b_enc) == pytest.approx(float(expected), abs=1e-12)
    head_terms, bias = head_dfa(model, z, 7, n_heads=4)  # each head's source terms sum to its head term
    assert torch.allclose(terms.sum(1) + offsets, head_terms[0], atol=1e-12) and float(bias[0]) == float(b_enc)


def test_source_attribution_refuses_a_per_token_normalisation():
    model = sae.get_architecture("topk")(sae.SAEConfig(arch="topk", d_in=32, n_features=16, k=4,
                                                       normalization="per_token_standardize"))
    with pytest.raises(HeadViewError, match="needs a scalar normalisation .* uses 'per_token_standardize'"):
        source_dfa(model, torch.ones(4, 3) / 3, torch.zeros(3, 4, 8), 0)


def test_attention_inputs_reproduce_the_models_hook_z(tiny_model):
    """The pattern and values read for one context give back the model's own z at that position."""
    tokens = torch.tensor([0, 5, 9, 14, 22, 7, 3])
    pattern, v = attention_inputs(tiny_model, HOOK_Z, tokens, 4)
    _, cache = tiny_model.run_with_cache(tokens[None], names_filter=[HOOK_Z])
    z = torch.einsum("hj,jhd->hd", pattern, v)
    torch.testing.assert_close(z, cache[HOOK_Z][0, 4], rtol=1e-5, atol=1e-6)
    assert pattern.shape == (4, 5) and torch.allclose(pattern.sum(-1), torch.ones(4))


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


def test_feature_page_attributes_the_top_context_to_source_positions(z_store, char_tokenizer, monkeypatch):
    """The source view runs the model on the top context and splits the feature's pre-activation at its peak over
    (head, source token); the parts add up to the pre-activation of the model's own z there."""
    root, model = z_store
    tiny_model = make_tiny_model(char_tokenizer, n_ctx=SHARD_ROWS + 1)  # the cache's contexts are 65 tokens
    monkeypatch.setenv("SAEWB_STORE", str(root / "store"))
    monkeypatch.setattr(data, "load_lm", lambda name, backend="transformer_lens": tiny_model)
    at = page("features").run()
    at.button(key="source_dfa").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    card = AnalysisStore(root / "store").feature("zsae", 0)
    token_ids, position = load_cache(root / "cache").context_of(card["top_contexts"][0]["row"])
    _, cache = tiny_model.run_with_cache(torch.as_tensor(token_ids[None], dtype=torch.long), names_filter=[HOOK_Z])
    z = cache[HOOK_Z][0, position].reshape(1, -1)
    expected = float(model.pre_acts(model.normalize(z)[0])[0, 0])
    caption = at.caption[-1].value
    assert caption.startswith(f"pre-activation at position {position} ")
    assert float(caption.split(" = ")[1].split(":")[0]) == pytest.approx(expected, abs=1e-3)
    table = at.dataframe[-2].value  # the ten largest terms (the last table is the neighbours)
    assert len(table) == min(10, 4 * (position + 1)) and set(table["head"]) <= {"H0", "H1", "H2", "H3"}
    assert len(at.get("plotly_chart")) == 3  # histogram, head bars, source bars


def test_an_sae_on_another_hook_has_no_head_views(tmp_path):
    make_cache(tmp_path / "cache")
    make_sae(tmp_path / "sae")
    analyze(tmp_path / "sae", tmp_path / "cache", out=tmp_path / "store", top_n=4, window=2, progress=False)
    assert AnalysisStore(tmp_path / "store").head_shares("sae", 0) is None
