"""A truncated, hand-edited or missing manifest.json is one CacheError that names the file and how to recover."""

import json

import pytest
import torch

import activations
from activations import CacheError
from experiments.cli import main
from tests.conftest import write_cache


@pytest.fixture
def cache_dir(tmp_path):
    return write_cache(tmp_path / "cache", torch.randn(300, 4, generator=torch.Generator().manual_seed(0)), 100)


def error(folder) -> str:
    with pytest.raises(CacheError) as info:
        activations.load_cache(folder)
    return str(info.value)


def test_truncated_manifest(cache_dir):
    text = (cache_dir / "manifest.json").read_text()
    (cache_dir / "manifest.json").write_text(text[: len(text) // 2])
    message = error(cache_dir)
    assert f"{cache_dir / 'manifest.json'} is damaged (not valid JSON" in message
    assert f"delete {cache_dir} and rerun the `saewb cache` command" in message


def test_manifest_that_is_not_an_object(cache_dir):
    (cache_dir / "manifest.json").write_text("[]")
    assert "is damaged (a JSON list, not an object)" in error(cache_dir)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.pop("shards"), "missing shards"),
        (lambda m: m.pop("d_in"), "missing d_in"),
        (lambda m: m.update(n_tokens="300"), "bad n_tokens (str)"),
        (lambda m: m.update(d_in={}), "bad d_in (a width for every hook)"),
        (lambda m: m["shards"][0].pop("rows"), "bad shards (each needs rows and files)"),
        (lambda m: m.update(context=True), "bad context (bool)"),
    ],
)
def test_hand_edited_manifest_names_the_keys(cache_dir, edit, problem):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    edit(manifest)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    message = error(cache_dir)
    assert "is damaged or hand-edited" in message and problem in message


def test_missing_manifest_in_a_non_empty_folder_does_not_suggest_a_refused_command(cache_dir):
    """`saewb cache --out DIR` refuses a non-empty folder without a manifest: the hint must not suggest it."""
    (cache_dir / "manifest.json").unlink()
    message = error(cache_dir)
    assert "holds files but no manifest.json" in message
    assert f"saewb cache --out {cache_dir}`" not in message and "--out NEW_FOLDER" in message


def test_saewb_train_on_a_damaged_manifest_is_one_line_exit_2(cache_dir, tmp_path, capsys):
    (cache_dir / "manifest.json").write_text("{")
    code = main(["train", "--activations", str(cache_dir), "--out", str(tmp_path / "run"), "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is damaged (not valid JSON" in err
