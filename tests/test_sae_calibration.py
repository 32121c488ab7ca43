"""Threshold calibration of Mutual-Choice and Feature-Choice SAEs (sae/calibration.py, docs/ALGORITHMS.md §2-§3)."""

import math

import pytest
import torch

import sae
from sae.calibration import capacity_scale
from sae.config import SAEConfig
from sae.errors import SAEConfigError, SAEDataError
from sae.registry import get_architecture
from sae.synthetic import planted_dictionary_data

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, K, B = 32, 128, 4, 256


@pytest.fixture(scope="module")
def data():
    """Planted data: 24,576 training rows, then a calibration sample and a held-out sample of 8,192 each."""
    acts = planted_dictionary_data(24_576 + 2 * 8192, D, F, K, zipf_exponent=0.7, noise_std=0.02, seed=3).acts
    return acts[:24_576], acts[24_576:32_768], acts[32_768:]


def short_run(arch: str, train, **options):
    """30 steps: the EMA thresholds (beta 0.999, from step 3) still hold their first values."""
    return sae.train(train[: 30 * B], arch=arch, n_features=F, k=K, batch_size=B, lr=3e-3, seed=0, progress=False,
                     **options)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_short_run_threshold_mode_l0_is_within_5_percent_of_k_on_held_out_rows(data, arch):
    """Bug fixed: after a short run the inference thresholds were the stale EMA (FC: L0 420 for k=32 in the
    30-step benchmark). Training now ends with a calibration pass; held-out L0 must land within ±5% of k."""
    train, _, held_out = data
    model = short_run(arch, train)
    l0 = sae.evaluate(model, held_out)["l0"]
    assert abs(l0 - K) <= 0.05 * K, f"held-out threshold-mode L0 {l0:.2f}, k={K}"
    record = model.training_info["calibration"]
    assert record["rows"] == 30 * B and record["source"] == "training data (in-sample)"
    assert record["reached_l0"] == pytest.approx(K, rel=0.01)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_stale_thresholds_are_what_calibration_fixes(data, arch):
    """The same run without the calibration pass (calibration_rows=0) is off by more than 5%: the test above
    measures the fix, not an easy case."""
    train, _, held_out = data
    stale = short_run(arch, train, calibration_rows=0)
    assert "calibration" not in stale.training_info
    l0 = sae.evaluate(stale, held_out)["l0"]
    assert abs(l0 - K) > 0.05 * K


def test_mutual_choice_calibration_hits_the_target_exactly_on_its_sample(data):
    train, sample, held_out = data
    model = short_run("mutual_choice", train)
    record = sae.calibrate(model, sample, target_l0=6, source="sample")
    z = model.encode(sample)
    assert int((z > 0).sum()) == 6 * sample.shape[0]  # exactly target * N entries above theta
    assert record == {"rows": 8192, "source": "sample", "target_l0": 6.0, "reached_l0": 6.0, "rule": "global"}
    assert model.training_info["calibration"] == record
    assert abs(sae.evaluate(model, held_out)["l0"] - 6) <= 0.3


def test_mutual_choice_threshold_is_the_brute_force_midpoint():
    """Float64 reference: theta midway between the (kN)-th and (kN+1)-th largest pre-activation."""
    model = get_architecture("mutual_choice")(SAEConfig(arch="mutual_choice", d_in=D, n_features=F, k=K,
                                                         normalization="none"), seed=1).double()
    x = torch.randn(300, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sae.calibrate(model, x, batch_size=64)  # several batches: exercises the per-batch candidate bound
    values = model.pre_acts(x).detach().flatten().sort(descending=True).values
    expected = (values[K * 300 - 1] + values[K * 300]) / 2
    assert model.threshold.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_feature_choice_calibration_gives_each_latent_its_share_of_rows(data, capacity):
    """n_i = min(round(s·N·m_i/B), P_i), s the recorded capacity scale (1 when no latent is short of positives)."""
    train, sample, _ = data
    model = short_run("feature_choice", train, fc_capacity=capacity)
    record = sae.calibrate(model, sample)
    m = model.capacities(B).double()
    fired = (model.encode(sample) > 0).sum(dim=0)
    positives = (model.pre_acts(model.normalize(sample)[0]) > 0).sum(dim=0)
    want = torch.round(record["capacity_scale"] * sample.shape[0] * m / B).to(torch.int64)
    assert torch.equal(fired, torch.minimum(want, positives))


def test_feature_choice_zipf_calibration_reaches_the_target_despite_latents_short_of_positives(data):
    """Bug fixed: a Zipf head latent asked for more rows than it has positive pre-activations fired on fewer, so
    in-sample L0 fell short of k (3.81 for k=4 here, 30.0 for k=32 on SmolLM2); the other capacities now scale up
    together until the mean L0 is the target."""
    train, sample, _ = data
    model = short_run("feature_choice", train, fc_capacity="zipf")
    record = sae.calibrate(model, sample)
    positives = (model.pre_acts(model.normalize(sample)[0]) > 0).sum(dim=0)
    share_rows = torch.round(sample.shape[0] * model.capacities(B).double() / B)
    assert bool((positives < share_rows).any())  # the case the fix is for
    assert record["capacity_scale"] > 1
    assert record["reached_l0"] == pytest.approx(K, abs=2e-3)  # a step of round(): 10 of 8192 x 4 entries here
    assert float((model.encode(sample) > 0).sum()) / sample.shape[0] == record["reached_l0"]


@pytest.mark.parametrize("capacity, target", [("uniform", K), ("zipf", K), ("uniform", F - 1), ("zipf", 2.5)])
def test_feature_choice_reached_l0_is_the_direct_count_on_the_sample(data, capacity, target):
    """The reached L0 is counted from the kept column tops (no extra pass); it must equal the L0 the thresholds give
    on the sample, also when the start scale's pass is redone for a larger s (zipf) and when the target cannot be
    reached (F - 1: every latent lets all its positive rows through)."""
    train, sample, _ = data
    model = short_run("feature_choice", train, fc_capacity=capacity)
    record = sae.calibrate(model, sample, target_l0=target)
    direct = float((model.encode(sample) > 0).sum()) / sample.shape[0]
    assert record["reached_l0"] == direct
    if target == F - 1:
        assert record["capacity_scale"] is None
        assert direct == float((model.pre_acts(model.normalize(sample)[0]) > 0).sum()) / sample.shape[0]


def test_capacity_scale_is_the_smallest_that_reaches_the_total():
    """Float64 reference by brute force over a fine grid of s."""
    share = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0], dtype=torch.float64)
    positives = torch.tensor([10, 100, 100, 100, 100])
    scale, counts = capacity_scale(share, positives, n_rows=100, target=0.9)
    assert int(counts.sum()) >= 90 and torch.equal(counts, torch.minimum(torch.round(scale * 100 * share).long(),
                                                                          positives))
    grid = [s / 1000 for s in range(1000, 4000)]
    smallest = next(s for s in grid if int(torch.minimum(torch.round(s * 100 * share).long(), positives).sum()) >= 90)
    assert smallest - 1e-3 < scale <= smallest
    # Unreachable: every positive row of the latents with a capacity, and no scale; the zero-share latent stays 0.
    scale, counts = capacity_scale(share, positives, n_rows=100, target=4.0)
    assert scale is None and counts.tolist() == [10, 100, 100, 100, 0]


def test_feature_choice_full_columns_match_the_running_top(monkeypatch, data):
    """Columns asked for many rows keep every value (FULL_COLUMN_ABOVE); both paths give the same theta."""
    import sae.calibration as calibration

    train, sample, _ = data
    model = short_run("feature_choice", train, fc_capacity="zipf")
    sae.calibrate(model, sample)
    running = model.threshold.clone()
    monkeypatch.setattr(calibration, "FULL_COLUMN_ABOVE", 0)
    sae.calibrate(model, sample)
    assert torch.equal(model.threshold, running)


def test_calibration_survives_save_and_load(tmp_path, data):
    train, sample, _ = data
    model = short_run("mutual_choice", train)
    sae.calibrate(model, sample, target_l0=5)
    loaded = sae.load(model.save(tmp_path / "mc"))
    assert torch.equal(loaded.threshold, model.threshold)
    assert loaded.training_info["calibration"]["target_l0"] == 5.0


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        ("topk", {}, "arch 'topk' has no inference thresholds to calibrate"),
        ("mutual_choice", {"target_l0": 0}, r"target_l0 must be in \(0, n_features=128\), got 0"),
        ("mutual_choice", {"target_l0": math.nan}, r"target_l0 must be in \(0, n_features=128\), got nan"),
        ("mutual_choice", {"max_rows": 0}, "max_rows must be a positive integer, got 0"),
        ("feature_choice", {}, "needs the training batch size"),
    ],
)
def test_bad_calibration_requests_are_one_clear_error(arch, kwargs, message):
    model = get_architecture(arch)(SAEConfig(arch=arch, d_in=D, n_features=F, k=K))
    with pytest.raises(SAEConfigError, match=message):
        sae.calibrate(model, torch.randn(64, D), **kwargs)


def test_non_finite_calibration_rows_change_nothing():
    model = get_architecture("mutual_choice")(SAEConfig(arch="mutual_choice", d_in=D, n_features=F, k=K))
    x = torch.randn(64, D)
    x[3, 1] = math.nan
    with pytest.raises(SAEDataError, match="NaN/inf"):
        sae.calibrate(model, x)
    assert not bool(model.threshold_initialized.any())
