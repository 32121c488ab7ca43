"""`saewb push`: the files and the model card it would send, --dry-run, and one-line errors; never the network
(HfApi's methods fail the test if called, except where recorders replace them)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors

from experiments.cli.root import main
from experiments.hub_push import CARD_METRICS, folder_files, model_card, push_operations
from tests.conftest import tiny_hub_sae

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
EVAL = {"l0": 2.0, "fvu": 0.4183920514583588, "explained_variance": 0.5816079485416412, "dead_frac": 0.03125,
        "dense_frac": 0.0, "ce_loss_recovered": None, "kl_div": 0.012345678901234, "delta_ce": 0.25,
        "in_sample": False, "selection_rule": "topk", "train_tokens": 1024}
HF_METHODS = ("create_repo", "create_branch", "create_commit", "upload_folder", "upload_file", "repo_info")
SIGNATURES = {name: inspect.signature(getattr(huggingface_hub.HfApi, name)) for name in HF_METHODS}
"""The installed huggingface_hub's own signatures, read before any test replaces the methods."""


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    folder = tiny_hub_sae(tmp_path_factory.mktemp("run") / "topk", HOOK)
    (folder / "eval.json").write_text(json.dumps(EVAL))
    (folder / "train_log.jsonl").write_text('{"step": 1}\n')  # not pushed
    return folder


@pytest.fixture
def sae_folder(trained_folder, tmp_path) -> Path:
    return Path(shutil.copytree(trained_folder, tmp_path / "topk"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any HfApi call fails the test; offline stays off unless a test sets it, so push's own check is tested."""
    for name in HF_METHODS:
        monkeypatch.setattr(huggingface_hub.HfApi, name,
                            lambda self, *a, _name=name, **k: pytest.fail(f"HfApi.{_name} was called"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def card_tables(card: str) -> dict[str, dict[str, str]]:
    """## section -> {first cell: second cell} of its markdown table's rows (the header row left out)."""
    tables, section = {}, None
    lines = card.splitlines() + [""]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("## "):
            section = line[3:]
            tables[section] = {}
        elif section and line.startswith("| ") and not lines[i + 1].startswith("|---"):
            key, value = (cell.strip() for cell in line.strip("|").split(" | "))
            tables[section][key] = value
    return tables


def test_the_operations_are_the_sae_files_then_the_card(sae_folder):
    files = folder_files(sae_folder)
    assert [f.name for f in files] == ["cfg.json", "sae_weights.safetensors", "workbench_state.safetensors",
                                       "eval.json"]
    operations = push_operations(files, "# card\n")
    assert all(isinstance(op, huggingface_hub.CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == [f.name for f in files] + ["README.md"]
    for op, f in zip(operations, files, strict=False):
        with op.as_file() as fh:
            assert fh.read() == f.read_bytes()
    with operations[-1].as_file() as fh:
        assert fh.read() == b"# card\n"


def test_the_model_card(sae_folder):
    cfg = json.loads((sae_folder / "cfg.json").read_text())
    card = model_card(cfg, EVAL, "org/name")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "sae-workbench"
    assert {"sparse-autoencoder", "topk"} <= set(front["tags"]) and "base_model" not in front  # fake-model: no id
    assert 'sae.load("hf://org/name")' in card
    tables = card_tables(card)
    assert tables["Architecture"] == {"architecture": "topk", "d_in": "16", "n_features": "32", "k": "2",
                                      "normalization": "scalar", "hook": HOOK, "model": "fake-model",
                                      "dtype": "float32"}
    training = tables["Training"]
    assert training["batch_size"] == "256" and training["total_tokens"] == "1024" and training["steps"] == "4"
    assert training["seed"] == "3" and "progress" not in training and "checkpoint_dir" not in training
    metrics = tables["Metrics"]
    expected = {k: EVAL[k] for k in CARD_METRICS if EVAL.get(k) is not None}
    assert list(metrics) == list(expected)  # in CARD_METRICS order; ce_loss_recovered is None: left out
    assert {k: float(v) for k, v in metrics.items()} == expected
    assert "held-out" in card
    assert 'sae.load("hf://org/name@dev")' in model_card(cfg, None, "org/name", "dev")
    assert "No eval.json metrics." in model_card(cfg, None, "org/name")


def test_a_saelens_folder_without_a_workbench_block_gets_a_card_too():
    cfg = {"architecture": "jumprelu", "d_in": 8, "d_sae": 64, "dtype": "float32",
           "metadata": {"model_name": "google/gemma-2-2b", "hook_name": "blocks.5.hook_resid_post"}}
    card = model_card(cfg, None, "org/name")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "google/gemma-2-2b" and "jumprelu" in front["tags"]
    assert card_tables(card)["Architecture"]["n_features"] == "64"
    assert "No training record in cfg.json." in card


def test_dry_run_prints_the_files_and_the_card_and_sends_nothing(sae_folder, capsys):
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("saewb push --dry-run: would commit to https://huggingface.co/org/name (branch main):\n")
    listed = [line.split()[0] for line in out.split("--- README.md ---")[0].splitlines()[1:]]
    assert listed == ["cfg.json", "sae_weights.safetensors", "workbench_state.safetensors", "eval.json", "README.md"]
    cfg = json.loads((sae_folder / "cfg.json").read_text())
    assert out.split("--- README.md ---\n")[1] == model_card(cfg, EVAL, "org/name")


def test_push_creates_the_repo_and_branch_and_commits_every_file(sae_folder, monkeypatch, capsys):
    calls = []

    def recorder(name, result=None):
        def record(self, *args, **kwargs):
            SIGNATURES[name].bind(self, *args, **kwargs)  # the call fits the installed huggingface_hub's signature
            calls.append((name, args, kwargs))
            return result
        return record

    commit = type("CommitInfo", (), {"commit_url": "https://huggingface.co/org/name/commit/abc"})()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", recorder("create_repo"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", recorder("create_branch"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", recorder("create_commit", commit))
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name", "--private", "--revision", "dev"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "create_commit"]
    assert calls[0][1:] == (("org/name",), {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][1:] == (("org/name",), {"repo_type": "model", "branch": "dev", "exist_ok": True})
    (repo_id, operations), kwargs = calls[2][1], calls[2][2]
    assert repo_id == "org/name" and kwargs["revision"] == "dev" and kwargs["repo_type"] == "model"
    assert [op.path_in_repo for op in operations] == ["cfg.json", "sae_weights.safetensors",
                                                      "workbench_state.safetensors", "eval.json", "README.md"]
    with operations[-1].as_file() as fh:
        assert b'sae.load("hf://org/name@dev")' in fh.read()
    out = capsys.readouterr().out
    assert "https://huggingface.co/org/name/commit/abc" in out and 'sae.load("hf://org/name@dev")' in out

    calls.clear()  # main and no --private: no branch to create, visibility left to the Hub's default
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_commit"]
    assert calls[0][2]["private"] is None and calls[1][2]["revision"] is None


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_offline_is_one_line_and_exit_2(sae_folder, monkeypatch, capsys):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name"]) == 2
    assert "saewb push: error: saewb push needs the network" in one_error_line(capsys)


@pytest.mark.parametrize("raised", [
    hub_errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode"),
    ConnectionError("[Errno 111] Connection refused"),
])
def test_a_connection_error_is_one_line_and_exit_2(sae_folder, monkeypatch, capsys, raised):
    def refuse(self, *args, **kwargs):
        raise raised

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name"]) == 2
    assert "needs the network to reach the Hugging Face Hub and cannot reach it" in one_error_line(capsys)


def test_a_refused_token_is_one_line(sae_folder, monkeypatch, capsys):
    def refuse(self, *args, **kwargs):
        exc = hub_errors.HfHubHTTPError.__new__(hub_errors.HfHubHTTPError)
        Exception.__init__(exc, "401 Client Error: Unauthorized\ndetails")
        exc.response = type("Response", (), {"status_code": 401})()
        raise exc

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name"]) == 2
    assert "refused to write to org/name (HTTP 401): log in" in one_error_line(capsys)


@pytest.mark.parametrize(("remove", "says"), [
    (("cfg.json", "sae_weights.safetensors"), "cfg.json and sae_weights.safetensors are missing"),
    (("cfg.json",), "cfg.json is missing; it holds eval.json, sae_weights.safetensors, train_log.jsonl, "
                    "workbench_state.safetensors"),
    (("workbench_state.safetensors",), "workbench_state.safetensors is missing"),
])
def test_a_folder_that_is_not_an_sae_folder_names_what_is_missing(sae_folder, capsys, remove, says):
    for name in remove:
        (sae_folder / name).unlink()
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name", "--dry-run"]) == 2
    assert says in one_error_line(capsys)


def test_a_damaged_folder_is_refused_before_anything_is_sent(sae_folder, capsys):
    (sae_folder / "sae_weights.safetensors").write_bytes(b"not safetensors")
    assert main(["push", "--sae", str(sae_folder), "--repo", "org/name"]) == 2
    assert "not a readable safetensors file" in one_error_line(capsys)


@pytest.mark.parametrize(("argv", "says"), [
    (["--repo", "hf://org/name"], "--repo takes ORG/NAME without hf://"),
    (["--repo", "name"], "--repo must be ORG/NAME"),
    (["--repo", "org/name/sub"], "--repo must be ORG/NAME"),
    (["--repo", "org/na me"], "may hold only"),
    (["--repo", "org/name", "--revision", "a b"], "revision"),
])
def test_bad_repo_and_revision_are_one_line(sae_folder, capsys, argv, says):
    assert main(["push", "--sae", str(sae_folder), *argv]) == 2
    assert says in one_error_line(capsys)


def test_a_hub_name_is_not_a_folder_to_push(capsys):
    assert main(["push", "--sae", "hf://org/other", "--repo", "org/name"]) == 2
    assert "is a hub name; saewb push uploads a local SAE folder" in one_error_line(capsys)

