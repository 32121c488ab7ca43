"""Evaluation metrics (docs/ALGORITHMS.md §7, §11) against float64 references and known values."""

import math

import pytest
import torch

import sae
from sae.config import SAEConfig
from sae.errors import SAEDataError
from sae.metrics import (
    MetricsAccumulator,
    ce_loss_recovered,
    cosine_similarity,
    dead_fraction,
    dense_fraction,
    density_histogram,
    evaluate,
    explained_variance,
    feature_density,
    fvu,
    gini,
    kl_score,
    l2_ratio,
    nmse0,
    relative_reconstruction_bias,
    ultra_low_fractions,
)
from sae.registry import get_architecture

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster and repeatably on one thread


def pair(n: int = 1000, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 4.0 + torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d)
    return x, x + 0.3 * torch.randn(n, d, generator=g)


def reference_fvu(x, x_hat):
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (len(x) * torch.var(x64, dim=0, unbiased=False).sum()))


def test_fvu_matches_float64_variance_reference():
    x, x_hat = pair()
    assert fvu(x, x_hat) == pytest.approx(reference_fvu(x, x_hat), rel=1e-12)
    assert explained_variance(x, x_hat) == pytest.approx(1 - reference_fvu(x, x_hat), rel=1e-12)
    assert 0.005 < fvu(x, x_hat) < 0.1


def test_streaming_accumulator_equals_one_shot_fvu_across_uneven_batches():
    x, x_hat = pair()
    z = torch.zeros(len(x), 4)
    acc = MetricsAccumulator(4)
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
        acc.update(x[lo:hi], x_hat[lo:hi], z[lo:hi])
    result = acc.compute()
    assert result["fvu"] == pytest.approx(reference_fvu(x, x_hat), rel=1e-12)
    assert result["nmse0"] == pytest.approx(nmse0(x, x_hat), rel=1e-12)
    assert result["n_tokens"] == 1000


def test_fvu_is_invariant_to_input_rescaling():
    x, x_hat = pair()
    assert fvu(7.3 * x, 7.3 * x_hat) == pytest.approx(fvu(x, x_hat), rel=1e-6)  # float32 rounding of 7.3 x
    x64, x_hat64 = x.double(), x_hat.double()
    assert fvu(7.3 * x64, 7.3 * x_hat64) == pytest.approx(fvu(x64, x_hat64), rel=1e-12)


def test_sae_explained_variance_is_invariant_to_scalar_normalisation():
    x, _ = pair(d=16)
    model = get_architecture("topk")(SAEConfig(arch="topk", d_in=16, n_features=64, k=4), seed=0)
    model.norm_scale.fill_(0.5)
    base = evaluate(model, x)
    model.norm_scale.fill_(0.5 / 8)  # the same SAE fed 8x larger activations
    scaled = evaluate(model, 8 * x)
    assert scaled["fvu"] == pytest.approx(base["fvu"], rel=1e-5)
    assert scaled["l0"] == base["l0"] == 4


def test_reconstruction_shape_metrics_on_a_half_size_reconstruction():
    x, _ = pair()
    half = 0.5 * x
    assert cosine_similarity(x, half) == pytest.approx(1.0, abs=1e-12)
    assert l2_ratio(x, half) == pytest.approx(0.5, rel=1e-12)
    assert relative_reconstruction_bias(x, half) == pytest.approx(0.5, rel=1e-12)
    assert nmse0(x, half) == pytest.approx(0.25, rel=1e-12)
    assert relative_reconstruction_bias(x, x) == pytest.approx(1.0, rel=1e-12)


def test_ce_loss_recovered_and_kl_score_formulas():
    assert ce_loss_recovered(ce_clean=3.0, ce_sae=3.0, ce_zero=10.0) == 1.0  # identity SAE
    assert ce_loss_recovered(ce_clean=3.0, ce_sae=10.0, ce_zero=10.0) == 0.0  # zero output
    assert ce_loss_recovered(ce_clean=3.0, ce_sae=4.4, ce_zero=10.0) == pytest.approx(0.8)
    assert kl_score(kl_sae=0.0, kl_zero=2.0) == 1.0
    assert kl_score(kl_sae=2.0, kl_zero=2.0) == 0.0
    assert sae.ce_loss_recovered is ce_loss_recovered


def test_gini_known_values():
    assert gini(torch.full((10,), 0.3)) == pytest.approx(0.0, abs=1e-12)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)
    assert gini(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25)


def test_density_metrics_on_a_crafted_code():
    n = 1_000_000
    fires = torch.tensor([n, n // 2, 5, 0, 1])  # firing counts per latent over n tokens
    density = fires.double() / n
    assert dead_fraction(density) == pytest.approx(1 / 5)
    assert dense_fraction(density) == pytest.approx(2 / 5)
    assert ultra_low_fractions(density) == {"below_1e-05": pytest.approx(2 / 5), "below_1e-06": 0.0}
    hist = density_histogram(density)
    assert hist["n_zero"] == 1 and sum(hist["counts"]) == 4
    edges = hist["edges"]
    bin_of = [max(i for i, e in enumerate(edges[:-1]) if e <= math.log10(p)) for p in (1e-6, 5e-6, 0.5)]
    assert [hist["counts"][b] for b in bin_of] == [1, 1, 1]
    assert hist["counts"][-1] == 1  # density 1.0 lands in the last bin [-0.25, 0]


def test_accumulator_l0_and_density_statistics():
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    x = torch.randn(4, 2)
    acc = MetricsAccumulator(3)
    acc.update(x[:2], x[:2], z[:2])
    acc.update(x[2:], x[2:], z[2:])
    r = acc.compute()
    assert r["l0"] == pytest.approx(1.5)
    assert r["l0_std"] == pytest.approx(torch.tensor([2.0, 0, 3, 1]).std(unbiased=False).item())
    assert r["l0_histogram"].tolist() == [1, 1, 1, 1]
    assert r["zero_latent_token_frac"] == 0.25
    assert r["density"].tolist() == feature_density(z).tolist() == [0.75, 0.25, 0.5]
    assert r["max_density"] == 0.75 and r["dead_frac"] == 0.0 and r["fvu"] == 0.0


def test_evaluate_rejects_mismatched_width():
    model = get_architecture("topk")(SAEConfig(arch="topk", d_in=16, n_features=64, k=4))
    with pytest.raises(SAEDataError, match="width 8 but the SAE has d_in=16"):
        evaluate(model, torch.randn(10, 8))


def test_l0_norm_correlation_matches_a_float64_reference_over_batches():
    """How much the per-token L0 follows the token's norm (MC's failure mode); streamed over batches."""
    from sae.metrics import MetricsAccumulator

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) * torch.rand(300, 1, generator=g) * 4
    z = (torch.rand(300, 20, generator=g) < x.norm(dim=1, keepdim=True) / 12).float()
    acc = MetricsAccumulator(20)
    for lo in range(0, 300, 64):
        acc.update(x[lo : lo + 64], x[lo : lo + 64], z[lo : lo + 64])
    l0, norm = (z > 0).sum(1).double(), x.double().norm(dim=1)
    expected = float(torch.corrcoef(torch.stack([l0, norm]))[0, 1])
    assert acc.compute()["l0_norm_corr"] == pytest.approx(expected, rel=1e-9)
    constant = MetricsAccumulator(20)
    constant.update(x, x, torch.ones(300, 20))
    assert math.isnan(constant.compute()["l0_norm_corr"])
