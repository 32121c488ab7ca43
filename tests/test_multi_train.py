"""train_many: several SAEs on one activation stream end exactly as when trained alone; mismatches are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_cache

import sae
from experiments.multi_train import SHARED_KEYS, train_many
from experiments.training import RESERVED, run_config_from_dict, train_run
from sae.synthetic import planted_dictionary_data

HOOK = "blocks.0.hook_resid_post"
D = 16


@pytest.fixture(scope="module")
def planted_caches(tmp_path_factory) -> tuple[Path, Path]:
    """Training (4096 rows) and held-out (1024 rows) caches of planted-dictionary data, d = 16."""
    data = planted_dictionary_data(5120, D, 32, 3, zipf_exponent=0.5, seed=0).acts
    root = tmp_path_factory.mktemp("planted")
    return write_cache(root / "train", data[:4096]), write_cache(root / "eval", data[4096:])


def run_config(caches: tuple[Path, Path], out: Path, **fields):
    train, held_out = caches
    base = {
        "activations": str(train),
        "eval_activations": str(held_out),
        "out": str(out),
        "n_features": 32,
        "k": 4,
        "batch_size": 256,
        "total_tokens": 2048,
        "lr": 1e-2,
        "seed": 3,
        "progress": False,
        "eval_tokens": 1024,
        "wandb": False,
        "log_every": 2,
    }
    return run_config_from_dict({**base, **fields})


def log_rows(folder: Path) -> list[dict]:
    """train_log.jsonl without the wall-clock throughput."""
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def test_cache_helper_reads_back_as_written(planted_caches):
    import activations

    cache = activations.load_cache(planted_caches[0])
    data = planted_dictionary_data(5120, D, 32, 3, zipf_exponent=0.5, seed=0).acts
    assert (cache.n_tokens, cache.d_in, cache.hooks) == (4096, D, [HOOK])
    assert torch.equal(cache.rows(1000, 1100), data[1000:1100])


def test_two_saes_on_one_stream_match_separate_runs_bit_for_bit(planted_caches, tmp_path, monkeypatch):
    sides = [{"arch": "topk", "k": 4}, {"arch": "mutual_choice", "k": 6, "lr": 5e-3, "aux_loss": "aux_zipf"}]
    alone = [train_run(run_config(planted_caches, tmp_path / f"alone{i}", **side)) for i, side in enumerate(sides)]

    reads = []
    import activations.reader

    original = activations.reader.ActivationCache.iter_batches

    def counting(self, *args, **kwargs):
        reads.append(kwargs.get("seed"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(activations.reader.ActivationCache, "iter_batches", counting)
    logged: list[list[int]] = [[], []]
    together = train_many(
        [run_config(planted_caches, tmp_path / f"together{i}", **side) for i, side in enumerate(sides)],
        log_fns=[lambda step, m, i=i: logged[i].append(step) for i in range(2)],
    )
    # One read per trainer to initialise (normalisation and b_pre) and one shared read for training; the
    # Mutual-Choice run's threshold calibration at the end reads contexts spread over the cache, not a pass.
    assert len(reads) == 3
    assert logged == [[2, 4, 6, 8]] * 2

    for (model_a, metrics_a), (model_b, metrics_b), i in zip(alone, together, range(2), strict=True):
        state_a, state_b = model_a.state_dict(), model_b.state_dict()
        assert state_a.keys() == state_b.keys()
        for name in state_a:
            assert torch.equal(state_a[name], state_b[name]), f"run {i}: {name} differs"
        for key in ("l0", "fvu", "dead_frac", "train_tokens"):
            assert metrics_a[key] == metrics_b[key]
        folder = tmp_path / f"together{i}"
        saved = json.loads((folder / "eval.json").read_text())
        assert saved["fvu"] == metrics_b["fvu"] and saved["shared_stream_runs"] == 2
        assert torch.equal(sae.load(folder).W_dec, model_a.W_dec)
        assert log_rows(folder) == log_rows(tmp_path / f"alone{i}")
    assert together[0][1]["fvu"] != together[1][1]["fvu"]  # two different SAEs, not one trained twice


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 512}, "must share 'batch_size', but run 0 ({a}) has 256 and run 1 ({b}) has 512"),
        ({"seed": 4}, "must share 'seed', but run 0 ({a}) has 3 and run 1 ({b}) has 4"),
        ({"total_tokens": 4096}, "must share 'total_tokens'"),
        ({"shuffle": False}, "must share 'shuffle', but run 0 ({a}) has True and run 1 ({b}) has False"),
        (
            {"hook": "blocks.1.hook_resid_post"},
            "must share 'hook', but run 0 ({a}) has 'blocks.0.hook_resid_post' "
            "and run 1 ({b}) has 'blocks.1.hook_resid_post'",
        ),
    ],
)
def test_runs_that_read_different_streams_are_refused(planted_caches, tmp_path, change, message):
    configs = [run_config(planted_caches, tmp_path / "a"), run_config(planted_caches, tmp_path / "b", **change)]
    expected = message.format(a=tmp_path / "a", b=tmp_path / "b")
    with pytest.raises(sae.SAEConfigError) as err:
        train_many(configs)
    assert expected in str(err.value)
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_other_activations_and_shared_out_folders_are_refused(planted_caches, tmp_path):
    other = run_config(planted_caches, tmp_path / "b", activations=str(planted_caches[1]))
    with pytest.raises(sae.SAEConfigError, match="must share 'activations'"):
        train_many([run_config(planted_caches, tmp_path / "a"), other])
    same_out = [run_config(planted_caches, tmp_path / "a"), run_config(planted_caches, tmp_path / "a", k=8)]
    with pytest.raises(sae.SAEConfigError, match=f"two runs share the out folder {tmp_path / 'a'}"):
        train_many(same_out)
    with pytest.raises(sae.SAEConfigError, match="got 1 log_fns for 2 configs"):
        train_many([run_config(planted_caches, tmp_path / "a"), run_config(planted_caches, tmp_path / "c")], [None])


def test_routers_read_the_one_field_table():
    """The keys a shared stream must agree on and the options a RunConfig refuses come from the field metadata."""
    assert SHARED_KEYS == ("activations", "hook", "batch_size", "total_tokens", "seed", "shuffle",
                           "shuffle_buffer_rows")
    assert RESERVED == {"arch", "d_in", "n_features", "k", "batch_size", "total_tokens", "lr", "seed",
                        "checkpoint_dir", "checkpoint_every", "progress"}
