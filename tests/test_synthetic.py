"""Planted-dictionary generators (sae/synthetic.py) and the synthetic benchmark's resume and tables."""

from __future__ import annotations

import json

import pytest
import torch

import sae as sae_lib
from experiments import synthetic_benchmark as bench
from sae import synthetic
from sae.config import SAEConfig
from sae.errors import SAEConfigError
from sae.synthetic import planted_dictionary_data


def variable(n: int = 20000, seed: int = 0, **kw) -> synthetic.PlantedData:
    return planted_dictionary_data(n, 16, 64, 4, count="variable", seed=seed, **kw)


def test_fixed_count_is_still_the_original_generator(monkeypatch):
    # Invariant: existing callers get bit-identical data. The original body, inline, is the reference;
    # a small chunk size makes the chunked gather cover several chunks.
    monkeypatch.setattr(synthetic, "GENERATION_CHUNK_ROWS", 700)
    n, d, n_atoms, k, seed = 3000, 16, 64, 4, 3
    g = torch.Generator().manual_seed(seed + synthetic.SEED_OFFSET)
    dictionary = torch.randn(n_atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    weights = torch.arange(1, n_atoms + 1, dtype=torch.float64) ** -1.2
    support = torch.multinomial(weights.expand(n, -1), k, replacement=False, generator=g)
    coefs = 0.5 + torch.rand(n, k, generator=g)
    acts = (coefs.unsqueeze(-1) * dictionary[support]).sum(dim=1) + 0.01 * torch.randn(n, d, generator=g)
    data = planted_dictionary_data(n, d, n_atoms, k, zipf_exponent=1.2, noise_std=0.01, seed=seed)
    assert torch.equal(data.acts, acts) and torch.equal(data.dictionary, dictionary)
    assert torch.equal(data.frequencies, torch.bincount(support.flatten(), minlength=n_atoms).double() / n)
    assert torch.equal(data.support, support) and torch.equal(data.counts, torch.full((n,), k))


def test_variable_counts_are_uniform_on_their_range_with_mean_k():
    data = variable()
    counts = data.counts
    assert int(counts.min()) == 1 and int(counts.max()) == 7  # default range 1 .. 2k-1
    assert torch.bincount(counts, minlength=8)[1:].min() > 0  # every count occurs
    # Uniform on 1..7 has mean 4 and std 2, so the mean of 20000 draws has std 2/sqrt(20000) = 0.014: 5 sigma = 0.07.
    assert float(counts.double().mean()) == pytest.approx(4.0, abs=0.07)
    # Each row lists exactly `count` distinct atoms, then -1 padding with coefficient 0.
    valid = data.support >= 0
    assert torch.equal(valid.sum(dim=1), counts)
    assert torch.equal(valid, torch.arange(7) < counts.unsqueeze(1))
    assert bool((data.coefs[~valid] == 0).all())
    assert bool(((data.coefs[valid] >= 0.5) & (data.coefs[valid] <= 1.5)).all())
    rows_sorted = torch.where(valid, data.support, -1 - torch.arange(7)).sort(dim=1).values
    assert bool((rows_sorted[:, 1:] != rows_sorted[:, :-1]).all())  # no atom twice in a sample
    # Frequencies are per-sample usage, so they sum to the mean count; Zipf makes rank 1 the most used.
    assert float(data.frequencies.sum()) == pytest.approx(float(counts.double().mean()), rel=1e-12)
    assert int(data.frequencies.argmax()) == 0 and data.frequencies[0] > 5 * data.frequencies[32:].mean()


def test_custom_count_range():
    data = variable(n=2000, min_atoms=3, max_atoms=5)
    assert set(data.counts.tolist()) == {3, 4, 5} and data.support.shape == (2000, 5)


def test_each_sample_is_the_coefficient_weighted_sum_of_its_atoms(monkeypatch):
    monkeypatch.setattr(synthetic, "GENERATION_CHUNK_ROWS", 600)  # several chunks
    data = variable(n=2000, high_norm_fraction=0.05)
    reference = torch.zeros(2000, 16, dtype=torch.float64)  # float64, one atom at a time
    for slot in range(data.support.shape[1]):
        atom = data.support[:, slot]
        reference += data.coefs[:, slot, None].double() * data.dictionary.double()[atom.clamp_min(0)]
    # float32 matmul of <= 7 terms of size <= 7.5 against float64: error ~ 1e-6.
    assert torch.allclose(data.acts.double(), reference, atol=1e-5, rtol=0)
    assert torch.allclose(data.reconstruct().double(), reference, atol=1e-5, rtol=0)
    # With noise, the residual is the noise: std 0.01 per dimension (x5 on high-norm rows).
    noisy = variable(n=2000, noise_std=0.01)
    assert float((noisy.acts - noisy.reconstruct()).std()) == pytest.approx(0.01, rel=0.05)


def test_same_seed_same_data_other_seed_differs():
    a, b, c = variable(n=3000, seed=5, noise_std=0.01), variable(n=3000, seed=5, noise_std=0.01), variable(n=3000)
    for name in ("acts", "dictionary", "support", "coefs", "counts", "frequencies"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.acts, c.acts) and not torch.equal(a.counts, c.counts)


def test_high_norm_fraction_scales_exactly_that_many_samples():
    base = variable(n=5000)
    data = variable(n=5000, high_norm_fraction=0.02, high_norm_scale=5.0)
    high = data.high_norm
    assert int(high.sum()) == 100 and not bool(base.high_norm.any())
    # The rows are drawn last, so everything else is the unscaled data and flagged rows are exactly x5.
    assert torch.equal(data.acts[~high], base.acts[~high]) and torch.equal(data.counts, base.counts)
    assert torch.equal(data.acts[high], base.acts[high] * 5.0)
    assert bool(((data.coefs[high] == 0) | ((data.coefs[high] >= 2.5) & (data.coefs[high] <= 7.5))).all())
    fixed = planted_dictionary_data(5000, 16, 64, 4, high_norm_fraction=0.1)  # also available for count="fixed"
    assert int(fixed.high_norm.sum()) == 500


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"count": "sometimes"}, "allowed: fixed, variable"),
        ({"count": "fixed", "max_atoms": 6}, "apply to count='variable'"),
        ({"count": "variable", "max_atoms": 65}, "max_atoms <= n_atoms=64"),
        ({"count": "variable", "min_atoms": 5, "max_atoms": 4}, "min_atoms <= max_atoms"),
        ({"high_norm_fraction": 1.5}, "high_norm_fraction must be in [0, 1]"),
    ],
)
def test_bad_generator_arguments_name_the_problem(kw, message):
    with pytest.raises(SAEConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        planted_dictionary_data(100, 16, 64, 4, **kw)


def test_pearson():
    x = torch.arange(10.0)
    assert bench.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert bench.pearson(x, -x) == pytest.approx(-1.0)
    assert bench.pearson(torch.full((10,), 8), x) is None  # TopK's constant L0 has no correlation


# ---- benchmark: resume, tables, errors ---------------------------------------------------------

TINY = ["--d", "8", "--atoms", "16", "--k", "2", "--steps", "4", "--batch-size", "32"]
TINY += ["--held-out-rows", "600", "--calibration-rows", "300"]  # held-out rounds up to 19 batches = 608
TINY_SETTINGS = bench.Settings(
    d=8,
    atoms=16,
    k=2,
    steps=4,
    batch_size=32,
    zipf=1.0,
    noise=0.01,
    min_atoms=1,
    max_atoms=3,
    high_norm_fraction=0.02,
    high_norm_scale=5.0,
    held_out_rows=608,
    calibration_rows=300,
)


def fake_train(calls: list):
    """Stands in for sae.train: an untrained SAE of the asked arch, so tests do not depend on the trainer."""

    def train(acts, *, arch, n_features, k, seed, **options):
        calls.append({"arch": arch, "seed": seed, "rows": acts.shape[0], **options})
        model = sae_lib.get_architecture(arch)(SAEConfig(arch=arch, d_in=acts.shape[1], n_features=n_features, k=k))
        if hasattr(model, "threshold"):  # as if training had learned one
            model.threshold.fill_(0.2)
            model.threshold_initialized.fill_(True)
        return model

    return train


def test_finished_runs_are_reused_not_retrained(monkeypatch, tmp_path, capsys):
    calls: list = []
    monkeypatch.setattr(sae_lib, "train", fake_train(calls))
    args = [*TINY, "--runs", "topk", "--generators", "fixed", "--out", str(tmp_path)]
    assert bench.main([*args, "--seeds", "0"]) == 0
    assert [(c["arch"], c["seed"], c["rows"]) for c in calls] == [("topk", 0, 4 * 32)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["runs"]) == {"fixed/topk/0"}
    assert bench.main([*args, "--seeds", "0", "1"]) == 0  # seed 0 is in results.json: only seed 1 trains
    assert [c["seed"] for c in calls] == [0, 1]
    assert "1 finished run(s) reused" in capsys.readouterr().err
    reloaded = json.loads((tmp_path / "results.json").read_text())
    assert reloaded["runs"]["fixed/topk/0"] == saved["runs"]["fixed/topk/0"]
    # An untrained TopK SAE on fixed data: L0 is k on every sample, so its correlations are undefined.
    record = reloaded["runs"]["fixed/topk/1"]
    assert record["l0"] == 2 and record["l0_std"] == 0 and record["corr_l0_norm"] is None
    md = (tmp_path / "synthetic.md").read_text()
    assert "| topk | " in md and "over 2 seed(s)" in md and "r(L0, count)" not in md  # count column: variable only
    rows = json.loads((tmp_path / "synthetic.json").read_text())["rows"]
    assert rows[0]["run"] == "topk" and rows[0]["l0"] == 2


def test_other_settings_refuse_to_resume(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sae_lib, "train", fake_train([]))
    args = ["--runs", "topk", "--generators", "fixed", "--seeds", "0", "--out", str(tmp_path)]
    bench.main([*TINY, *args])
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--steps", "5", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "steps: 4 -> 5" in err and "--fresh" in err
    assert bench.main([*TINY, "--steps", "5", *args, "--fresh"]) == 0


def test_threshold_runs_are_calibrated_apart_from_held_out_rows_when_the_library_can(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(sae_lib, "train", fake_train(calls))
    monkeypatch.delattr(sae_lib, "calibrate", raising=False)
    args = [
        *TINY,
        "--runs",
        "mutual_choice",
        "topk",
        "--generators",
        "variable",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
    ]
    bench.main(args)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs["variable/mutual_choice/0"]["calibrated"] is False
    assert "(uncalibrated)" in (tmp_path / "synthetic.md").read_text()
    mc = runs["variable/mutual_choice/0"]
    assert {"batch_fvu", "batch_l0", "batch_corr_l0_count", "l0_high_norm_ratio"} <= set(mc)
    assert mc["batch_l0"] == pytest.approx(2.0)  # batch rule keeps k*B entries per batch of whole batches
    assert "batch_fvu" not in runs["variable/topk/0"]

    seen: list = []

    def calibrate(model, activations, target_l0=None, max_rows=131072):
        seen.append(activations)
        return {"threshold": 0.3, "l0": 2.0, "per_feature": [1.0]}

    monkeypatch.setattr(sae_lib, "calibrate", calibrate, raising=False)
    bench.main(args)  # calibrate has appeared: the uncalibrated MC run is redone, TopK is reused
    assert [c["arch"] for c in calls] == ["mutual_choice", "topk", "mutual_choice"]
    data = bench.make_data(TINY_SETTINGS, "variable", 0)  # the same seeded draw the run used
    assert len(seen) == 1 and torch.equal(seen[0], data.acts[128 : 128 + 300])
    record = json.loads((tmp_path / "results.json").read_text())["runs"]["variable/mutual_choice/0"]
    assert record["calibrated"] is True and record["calibration"] == {"threshold": 0.3, "l0": 2.0}


def test_table_reports_mean_and_std_over_seeds():
    runs = {
        "variable/mutual_choice/0": {"mean_max_cosine": 0.9, "fvu": 0.1, "corr_l0_count": 0.5, "calibrated": True},
        "variable/mutual_choice/1": {"mean_max_cosine": 0.7, "fvu": 0.3, "corr_l0_count": None, "calibrated": True},
    }
    rows = bench.summarize({"runs": runs}, ["variable"], ["mutual_choice"], [0, 1])
    text = bench.table(rows, "variable", TINY_SETTINGS)
    assert "| mutual_choice | 0.800 ± 0.100 |" in text  # population std of {0.9, 0.7}
    assert "0.2000 ± 0.1000" in text and "0.50 ± 0.00" in text  # an undefined seed is left out, not zero
    assert "1..3 atoms per sample (mean 2), 2% of samples x5" in text and "(uncalibrated)" not in text


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [("--runs", "topk+magic", tuple(bench.RUNS)), ("--generators", "zipfian", bench.GENERATORS)],
)
def test_unknown_run_label_or_generator_exits_2_naming_the_allowed(capsys, tmp_path, flag, value, allowed):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then one error line
    assert f"invalid choice: '{value}'" in err and all(f"'{label}'" in err for label in allowed)
    assert not (tmp_path / "results.json").exists()


def test_a_failing_run_exits_2_in_one_line_and_keeps_the_finished_ones(monkeypatch, tmp_path, capsys):
    calls: list = []
    train = fake_train(calls)

    def failing(acts, *, arch, **kw):
        if arch == "feature_choice":
            raise SAEConfigError("batch_size=32 is too small: the minimum batch size is 64.")
        return train(acts, arch=arch, **kw)

    monkeypatch.setattr(sae_lib, "train", failing)
    args = [*TINY, "--runs", "topk", "feature_choice", "--generators", "fixed", "--seeds", "0", "--out", str(tmp_path)]
    assert bench.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"minimum batch size is 64. (finished runs are kept in {tmp_path / 'results.json'})")
    assert "usage:" not in "\n".join(err)
    assert set(json.loads((tmp_path / "results.json").read_text())["runs"]) == {"fixed/topk/0"}
