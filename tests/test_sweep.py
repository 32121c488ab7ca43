"""Sweeps: validation messages, grid/random expansion, a local end-to-end sweep that resumes, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import yaml
from conftest import write_cache

import sae
from experiments import multi_train, training
from experiments.cli.sweep import add_sweep_parser, cmd_sweep
from experiments.sweeps.expand import local_runs, run_names, sample_value
from experiments.sweeps.runner import run_sweep
from experiments.sweeps.spec import known_metrics, load_sweep
from experiments.wandb_logging import scalar_metrics
from sae.synthetic import planted_dictionary_data


def write_sweep(folder: Path, data: dict, name: str = "s.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


ACTS = {"activations": {"value": "runs/demo/cache"}}


def expand(tmp_path, data: dict, count=None, seed=0) -> tuple[list[dict], list[str]]:
    loaded = load_sweep(write_sweep(tmp_path, data), count=count)
    runs = local_runs(loaded, count=count, seed=seed)
    return runs, run_names(loaded, runs)


# -- expansion ----------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_in_file_order(tmp_path):
    data = {
        "method": "grid",
        "parameters": {
            **ACTS,
            "k": {"values": [16, 32, 64]},
            "arch": {"values": ["topk", "mutual_choice"]},
            "aux_loss": {"value": "aux_zipf"},
        },
    }
    runs, names = expand(tmp_path, data)
    assert [(r["k"], r["arch"]) for r in runs] == [
        (16, "topk"),
        (16, "mutual_choice"),
        (32, "topk"),
        (32, "mutual_choice"),
        (64, "topk"),
        (64, "mutual_choice"),
    ]
    assert all(r["aux_loss"] == "aux_zipf" and r["activations"] == "runs/demo/cache" for r in runs)
    assert names[:2] == ["k=16,arch=topk", "k=16,arch=mutual_choice"]
    assert len(set(names)) == 6
    first_two, _ = expand(tmp_path, data, count=2)
    assert first_two == runs[:2]


def test_random_samples_are_seeded_and_within_their_bounds(tmp_path):
    data = {
        "method": "random",
        "count": 400,
        "parameters": {
            **ACTS,
            "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "k": {"distribution": "int_uniform", "min": 8, "max": 12},
            "grad_beta": {"min": 0.5, "max": 1.5},  # no distribution: uniform, as W&B infers it
            "n_features": {"distribution": "q_uniform", "min": 1000, "max": 5000, "q": 512},
            "arch": {"values": ["topk", "mutual_choice", "feature_choice"], "probabilities": [0.5, 0.5, 0.0]},
        },
    }
    runs, names = expand(tmp_path, data, seed=7)
    again, _ = expand(tmp_path, data, seed=7)
    other, _ = expand(tmp_path, data, seed=8)
    assert runs == again and runs != other
    lrs = [r["lr"] for r in runs]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    # Log-uniform: half the draws below the geometric mean 1e-3 (uniform would put 9% there).
    assert 0.4 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.6
    ks = [r["k"] for r in runs]
    assert all(isinstance(k, int) for k in ks) and set(ks) == {8, 9, 10, 11, 12}  # both ends included
    assert all(0.5 <= r["grad_beta"] <= 1.5 for r in runs) and len({r["grad_beta"] for r in runs}) == 400
    assert {r["n_features"] for r in runs} <= {1024, 1536, 2048, 2560, 3072, 3584, 4096, 4608, 5120}
    assert all(isinstance(r["n_features"], int) for r in runs)
    assert {r["arch"] for r in runs} == {"topk", "mutual_choice"}  # probability 0 is never drawn
    assert len(set(names)) == 400  # repeated names would get -2, -3...


def test_log_uniform_takes_exponents_and_repeated_draws_get_numbered_names(tmp_path):
    rng = random.Random(0)
    values = [sample_value({"distribution": "log_uniform", "min": -2.0, "max": 0.0}, rng) for _ in range(100)]
    assert all(math.exp(-2) <= v <= 1.0 for v in values)
    runs, names = expand(
        tmp_path, {"method": "random", "count": 6, "parameters": {**ACTS, "k": {"values": [16, 32]}}}, seed=1
    )
    assert [r["k"] for r in runs] == [16, 32, 32, 16, 16, 16]
    assert names == ["k=16", "k=32", "k=32-2", "k=16-2", "k=16-3", "k=16-4"]


def test_random_over_finite_values_without_count_runs_the_grid_in_a_seeded_order(tmp_path):
    data = {"method": "random", "parameters": {**ACTS, "k": {"values": [8, 16, 32, 64]}, "seed": {"values": [0, 1]}}}
    runs, _ = expand(tmp_path, data, seed=3)
    grid, _ = expand(tmp_path, {**data, "method": "grid"})
    assert len(runs) == 8 and sorted(runs, key=lambda r: (r["k"], r["seed"])) == grid
    assert runs != grid and runs == expand(tmp_path, data, seed=3)[0]


def test_bayes_runs_locally_as_random_with_a_note(tmp_path, capsys):
    data = {
        "method": "bayes",
        "metric": {"name": "fvu", "goal": "minimize"},
        "run_cap": 3,
        "parameters": {**ACTS, "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-3}},
    }
    runs, _ = expand(tmp_path, data, seed=5)
    random_runs, _ = expand(tmp_path, {**data, "method": "random"}, seed=5)
    assert runs == random_runs and len(runs) == 3
    assert "bayes search needs W&B's sweep server; sampling the runs at random instead" in capsys.readouterr().err


def test_command_line_count_beats_the_file_and_the_smaller_of_count_and_run_cap_wins(tmp_path):
    data = {"method": "random", "count": 5, "run_cap": 3, "parameters": {**ACTS, "lr": {"min": 1e-4, "max": 1e-3}}}
    assert len(expand(tmp_path, data)[0]) == 3
    assert len(expand(tmp_path, data, count=7)[0]) == 7


def test_local_runs_refuses_what_it_cannot_expand():
    lr = {"distribution": "uniform", "min": 0.1, "max": 1.0}
    with pytest.raises(sae.SAEConfigError, match="a grid sweep needs `value`/`values` for every parameter"):
        local_runs({"method": "grid", "parameters": {"lr": lr}})
    with pytest.raises(sae.SAEConfigError, match=r"random search over a distribution needs a count \(count:"):
        local_runs({"method": "random", "parameters": {"lr": lr}})
    assert [0.1 <= r["lr"] <= 1.0 for r in local_runs({"method": "random", "parameters": {"lr": lr}}, 3)] == [True] * 3


def test_the_example_sweeps_load_and_expand():
    folder = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"
    expected = {
        "topk_k_grid": ["k=16", "k=32", "k=64"],
        "arch_compare": ["arch=topk", "arch=mutual_choice", "arch=feature_choice"],
    }
    for name, names in expected.items():
        loaded = load_sweep(folder / f"{name}.yaml")
        runs = local_runs(loaded)
        assert run_names(loaded, runs) == names
        assert all(r["activations"] == "runs/demo/cache" and r["n_features"] == 4608 for r in runs)
        assert all(r["k"] == 32 for r in runs) or name == "topk_k_grid"
    lr = load_sweep(folder / "lr_random.yaml")
    runs = local_runs(lr)
    assert len(runs) == 4 and all(5e-5 <= r["lr"] <= 2e-3 for r in runs)
    assert lr["metric"] == {"name": "fvu", "goal": "minimize"}


# -- validation -------------------------------------------------------------------------------------

GOOD = {"method": "grid", "metric": {"name": "fvu", "goal": "minimize"}, "parameters": {**ACTS, "k": {"values": [8]}}}


def with_params(**params) -> dict:
    return {**GOOD, "parameters": {**ACTS, **params}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({k: v for k, v in GOOD.items() if k != "parameters"}, "missing `parameters`: a mapping of field name"),
        ({**GOOD, "parameters": {}}, "missing `parameters`"),
        ({**GOOD, "method": "hyperband"}, "unknown method 'hyperband'; allowed: grid, random, bayes"),
        ({k: v for k, v in GOOD.items() if k != "method"}, "missing `method`: one of grid, random, bayes"),
        (
            with_params(kk={"value": 3}),
            "unknown parameter 'kk': not a RunConfig, SAEConfig or TrainConfig field; allowed: activations, adam_beta1",
        ),
        (with_params(d_in={"value": 3}), "unknown parameter 'd_in'"),
        (with_params(out={"value": "x"}), "parameter 'out' is set per run (<out root>/<run name>); set `out_root`"),
        (
            {
                **GOOD,
                "method": "random",
                "count": 2,
                "parameters": {**ACTS, "lr": {"distribution": "gamma", "min": 1, "max": 2}},
            },
            "parameter 'lr' has unknown distribution 'gamma'; supported: constant, categorical, uniform, q_uniform",
        ),
        (
            {**GOOD, "method": "random", "count": 2, "parameters": {**ACTS, "lr": {"min": 0.1, "max": 0.1}}},
            "parameter 'lr': min (0.1) must be smaller than max (0.1)",
        ),
        (
            {
                **GOOD,
                "method": "random",
                "count": 2,
                "parameters": {**ACTS, "lr": {"distribution": "uniform", "min": 0.1}},
            },
            "parameter 'lr': distribution uniform needs both min and max",
        ),
        (
            {
                **GOOD,
                "method": "random",
                "count": 2,
                "parameters": {**ACTS, "k": {"distribution": "int_uniform", "min": 1.5, "max": 8}},
            },
            "parameter 'k': int_uniform needs integer min and max, got 1.5 and 8",
        ),
        (
            {
                **GOOD,
                "method": "random",
                "count": 2,
                "parameters": {**ACTS, "lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}},
            },
            "parameter 'lr': log_uniform_values needs min > 0, got 0",
        ),
        (with_params(k={"values": []}), "parameter 'k' has an empty values list"),
        (with_params(k={"values": 16}), "parameter 'k': `values` must be a list, got 16"),
        (with_params(k=16), "parameter 'k' must be a mapping such as {value: 32}"),
        (with_params(k={"vals": [16]}), "parameter 'k' has unknown key(s) ['vals']; allowed: value, values"),
        (with_params(k={"value": 16, "values": [16]}), "parameter 'k' has both `value` and `values`; give one"),
        (with_params(k={"q": 2}), "parameter 'k' needs `value`, `values`, or a distribution with min and max"),
        (
            with_params(arch={"values": ["topk", "mutual_choice"], "probabilities": [0.5, 0.6]}),
            "parameter 'arch': `probabilities` must be 2 non-negative numbers summing to 1",
        ),
        (
            with_params(lr={"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}),
            "parameter 'lr' has distribution log_uniform_values, which a grid cannot enumerate; "
            "give it `values: [...]`",
        ),
        (
            {**GOOD, "method": "random", "parameters": {**ACTS, "lr": {"min": 1e-4, "max": 1e-2}}},
            "random search over a distribution never runs out of samples: add `count: N` (or `run_cap: N`) to the "
            "file, or pass --count N",
        ),
        (
            {**GOOD, "metric": {"name": "fvu", "goal": "lowest"}},
            "unknown metric goal 'lowest'; allowed: minimize, maximize",
        ),
        ({**GOOD, "metric": {"name": "FVU"}}, "metric 'FVU' is not a number a run reports; known: "),
        ({**GOOD, "metric": "fvu"}, "`metric` needs a name, e.g. metric: {name: fvu, goal: minimize}; got 'fvu'"),
        ({**GOOD, "parameter": {}}, "unknown key(s) ['parameter']; a sweep file holds: name, description, method"),
        ({**GOOD, "count": 0}, "`count` must be a positive integer, got 0"),
        ({**GOOD, "parameters": {"k": {"values": [8]}}}, "parameters need `activations` (an activation cache folder)"),
        (
            {k: v for k, v in GOOD.items() if k != "metric"} | {"method": "bayes"},
            "bayes search needs a `metric` to optimise",
        ),
    ],
)
def test_each_problem_has_its_own_clear_message(tmp_path, data, message):
    path = write_sweep(tmp_path, data)
    with pytest.raises(sae.SAEConfigError) as err:
        load_sweep(path)
    assert message in str(err.value)
    assert str(err.value).startswith(f"sweep file {path}: ")  # exactly one problem: one line


def test_unknown_parameter_error_lists_the_allowed_names(tmp_path):
    with pytest.raises(sae.SAEConfigError) as err:
        load_sweep(write_sweep(tmp_path, with_params(kk={"value": 3})))
    allowed = str(err.value).split("allowed: ")[1].split(", ")
    for name in ("activations", "arch", "k", "lr", "n_features", "aux_loss", "fc_capacity", "warmup_steps", "seed"):
        assert name in allowed
    assert "out" not in allowed and "d_in" not in allowed and "checkpoint_dir" not in allowed


def test_several_problems_are_listed_together(tmp_path):
    data = {"method": "hyperband", "metric": {"name": "fvu", "goal": "up"}, "parameters": {**ACTS, "k": {"values": []}}}
    with pytest.raises(sae.SAEConfigError) as err:
        load_sweep(write_sweep(tmp_path, data))
    assert str(err.value).splitlines()[1:] == [
        "  - unknown method 'hyperband'; allowed: grid, random, bayes",
        "  - unknown metric goal 'up'; allowed: minimize, maximize",
        "  - parameter 'k' has an empty values list",
    ]
    assert "has 3 problems" in str(err.value).splitlines()[0]


def test_files_that_are_not_sweeps(tmp_path):
    with pytest.raises(sae.SAEConfigError, match="sweep file .*missing.yaml does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(sae.SAEConfigError, match="must hold a mapping with method, metric and parameters"):
        load_sweep(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("method: [grid\n")
    with pytest.raises(sae.SAEConfigError, match="bad.yaml is not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")


# -- running locally -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    data = planted_dictionary_data(5120, 16, 32, 3, zipf_exponent=0.5, seed=1).acts
    root = tmp_path_factory.mktemp("sweep-caches")
    return write_cache(root / "train", data[:4096]), write_cache(root / "eval", data[4096:])


def tiny_sweep(caches, **params) -> dict:
    train, held_out = caches
    fixed = {
        "activations": str(train),
        "eval_activations": str(held_out),
        "n_features": 32,
        "batch_size": 256,
        "total_tokens": 2048,
        "lr": 1e-2,
        "seed": 3,
        "progress": False,
        "eval_tokens": 1024,
        "log_every": 4,
    }
    return {
        "name": "tiny",
        "method": "grid",
        "metric": {"name": "fvu", "goal": "minimize"},
        "parameters": {**{k: {"value": v} for k, v in fixed.items()}, **params},
    }


@pytest.fixture
def count_training(monkeypatch):
    calls = {"train_run": [], "train_many": []}
    for module, name in ((training, "train_run"), (multi_train, "train_many")):
        original = getattr(module, name)

        def counted(cfgs, *args, _original=original, _name=name, **kwargs):
            calls[_name].append(cfgs)
            return _original(cfgs, *args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_local_sweep_ranks_by_the_metric_and_resumes(caches, tmp_path, capsys, count_training):
    path = write_sweep(tmp_path, tiny_sweep(caches, k={"values": [2, 8]}))
    out = tmp_path / "out"
    results = run_sweep(path, out_root=out, wandb=False)
    assert [c.out for c in count_training["train_run"]] == [str(out / "k=2"), str(out / "k=8")]
    saved = json.loads((out / "sweep_results.json").read_text())
    assert saved["sweep"] == "tiny" and saved["metric"] == {"name": "fvu", "goal": "minimize"}
    assert [r["name"] for r in saved["runs"]] == ["k=8", "k=2"]  # more latents per token reconstruct better
    assert saved["runs"][0]["metrics"]["fvu"] < saved["runs"][1]["metrics"]["fvu"]
    for entry in saved["runs"]:
        eval_json = json.loads((out / entry["name"] / "eval.json").read_text())
        assert entry["metrics"]["fvu"] == eval_json["fvu"] and entry["status"] == "trained"
        assert entry["params"]["k"] == int(entry["name"][2:])
    assert saved["runs"] == results
    assert not list(out.glob(".*.tmp"))  # written atomically: no temp file left
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "sweep tiny (grid, 2 run(s))"
    assert table[1].split() == [
        "#",
        "run",
        "fvu",
        "(min)",
        "l0",
        "explained_variance",
        "dead_frac",
        "dense_frac",
        "status",
    ]
    assert table[2].split()[:2] == ["1", "k=8"] and table[3].split()[:2] == ["2", "k=2"]
    # Every metric name a sweep may rank by is one a real run reports.
    real = set(scalar_metrics(eval_json)) | {"batch_mode/l0", "batch_mode/fvu"}
    assert set(known_metrics()) <= real

    again = run_sweep(path, out_root=out, wandb=False)
    assert len(count_training["train_run"]) == 2  # nothing retrained
    assert [r["status"] for r in again] == ["reused", "reused"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]

    (out / "k=2" / "eval.json").unlink()  # as if killed before k=2 finished
    third = run_sweep(path, out_root=out, wandb=False)
    assert [c.out for c in count_training["train_run"][2:]] == [str(out / "k=2")]
    assert {r["name"]: r["status"] for r in third} == {"k=8": "reused", "k=2": "trained"}
    assert third[1]["metrics"]["fvu"] == results[1]["metrics"]["fvu"]  # seeded: the same SAE again


def test_shared_stream_trains_the_group_together_with_the_same_results(caches, tmp_path, count_training):
    path = write_sweep(tmp_path, tiny_sweep(caches, k={"values": [2, 8]}, seed={"values": [3, 4]}))
    alone = run_sweep(path, out_root=tmp_path / "alone", wandb=False)
    together = run_sweep(path, out_root=tmp_path / "together", wandb=False, shared_stream=True)
    assert len(count_training["train_run"]) == 4
    groups = [[Path(c.out).name for c in cfgs] for cfgs in count_training["train_many"]]
    assert groups == [["seed=3,k=2", "seed=3,k=8"], ["seed=4,k=2", "seed=4,k=8"]]  # one stream per seed
    assert [(r["name"], r["metrics"]["fvu"]) for r in together] == [(r["name"], r["metrics"]["fvu"]) for r in alone]


def test_a_failing_run_is_recorded_and_the_others_finish(caches, tmp_path, capsys):
    path = write_sweep(tmp_path, tiny_sweep(caches, k={"values": [64, 4]}))  # k=64 >= n_features=32
    parser = argparse.ArgumentParser(prog="saewb")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-wandb"])
    assert args.func(args) == 1
    saved = json.loads((tmp_path / "out" / "sweep_results.json").read_text())
    assert [(r["name"], r["status"]) for r in saved["runs"]] == [("k=4", "trained"), ("k=64", "failed")]
    assert "k=64 must be smaller than n_features=32" in saved["runs"][1]["error"]
    assert "[saewb sweep] run(s) k=64 failed: k=64 must be smaller than n_features=32" in capsys.readouterr().err


def test_a_missing_cache_stops_the_sweep_before_training(tmp_path, count_training):
    data = {**GOOD, "parameters": {"activations": {"value": str(tmp_path / "nope")}, "k": {"values": [8]}}}
    import activations

    with pytest.raises(activations.CacheError, match="is not an activation cache"):
        run_sweep(write_sweep(tmp_path, data), out_root=tmp_path / "out", wandb=False)
    assert count_training["train_run"] == []


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        assert allow_val_change
        super().update(values)


class FakeRun:
    def __init__(self, config: dict):
        self.config, self.name, self.summary, self.logged, self.exit_codes = FakeConfig(config), None, {}, [], []
        self.settings = type("Settings", (), {"sync_dir": None})()

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self, exit_code=0):
        self.exit_codes.append(exit_code)


def test_local_sweep_logs_each_run_to_its_own_wandb_run(caches, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    inits, runs = [], []

    def init(**kwargs):
        inits.append(kwargs)
        runs.append(FakeRun(kwargs["config"]))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    path = write_sweep(tmp_path, tiny_sweep(caches, k={"values": [2, 8]}))
    results = run_sweep(path, out_root=tmp_path / "out")
    assert [(i["name"], i["group"], i["mode"], i["config"]["k"]) for i in inits] == [
        ("k=2", "tiny", "offline", 2),
        ("k=8", "tiny", "offline", 8),
    ]
    for run, name in zip(runs, ["k=2", "k=8"], strict=True):
        assert [step for step, _ in run.logged] == [4, 8] and "train/loss" in run.logged[0][1]
        assert run.summary["fvu"] == next(r["metrics"]["fvu"] for r in results if r["name"] == name)
        assert run.exit_codes == [0]


def test_online_sweep_goes_through_wandb_sweep_and_agent(caches, tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    data = tiny_sweep(caches, k={"values": [2, 8]})
    data.update(method="random", count=2, out_root="ignored-by-wandb")
    path = write_sweep(tmp_path, data)
    calls = {}
    picks = iter([{**{k: v["value"] for k, v in data["parameters"].items() if "value" in v}, "k": k} for k in (8, 2)])
    runs, trained = [], []

    def fake_sweep(config, project=None, entity=None):
        calls["sweep"] = (config, project)
        return "sweep123"

    def fake_agent(sweep_id, function, count=None, project=None, entity=None):
        calls["agent"] = (sweep_id, count, project)
        for _ in range(count):
            function()

    def fake_init(**kwargs):
        runs.append(FakeRun(next(picks)))
        assert kwargs["mode"] == "online" and kwargs["group"] == "tiny"
        return runs[-1]

    def fake_train_run(cfg, log_fn=None):
        trained.append(cfg)
        log_fn(4, {"loss": 1.0 / cfg.k})
        return None, {"fvu": 1.0 / cfg.k, "l0": float(cfg.k)}

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    monkeypatch.setattr(wandb, "agent", fake_agent)
    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(training, "train_run", fake_train_run)
    results = run_sweep(path, out_root=tmp_path / "out")
    config, project = calls["sweep"]
    assert "count" not in config and "out_root" not in config and config["parameters"] == data["parameters"]
    assert project == "sae-workbench" and calls["agent"] == ("sweep123", 2, "sae-workbench")
    assert [(c.k, c.out) for c in trained] == [(8, str(tmp_path / "out" / "k=8")), (2, str(tmp_path / "out" / "k=2"))]
    assert [r.name for r in runs] == ["k=8", "k=2"]
    assert runs[0].config["out"] == str(tmp_path / "out" / "k=8")  # the full RunConfig is recorded
    assert runs[0].summary == {"fvu": 0.125, "l0": 8.0} and runs[0].logged == [(4, {"train/loss": 0.125})]
    assert [(r["name"], r["metrics"]["fvu"]) for r in results] == [("k=8", 0.125), ("k=2", 0.5)]
    assert "W&B sweep sweep123 in project sae-workbench" in capsys.readouterr().err


# -- command line ------------------------------------------------------------------------------------


def test_sweep_subcommand_flags_and_help(capsys):
    parser = argparse.ArgumentParser(prog="saewb")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "sweep",
            "f.yaml",
            "--count",
            "3",
            "--out",
            "d",
            "--no-wandb",
            "--local",
            "--shared-stream",
            "--sample-seed",
            "5",
        ]
    )
    assert (args.file, args.count, args.out, args.no_wandb, args.local, args.shared_stream, args.sample_seed) == (
        "f.yaml",
        3,
        "d",
        True,
        True,
        True,
        5,
    )
    assert args.func is cmd_sweep
    defaults = parser.parse_args(["sweep", "f.yaml"])
    assert (defaults.count, defaults.out, defaults.no_wandb, defaults.local, defaults.sample_seed) == (
        None,
        None,
        False,
        False,
        0,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "f.yaml", "--count", "0"])
    assert "--count: must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "method: grid",
        "log_uniform_values",
        "wandb sync",
        "sweep_results.json",
        "already holds eval.json, so an interrupted sweep resumes",
        "bayes falls back to random",
    ):
        assert phrase in help_text
