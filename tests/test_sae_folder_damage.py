"""A damaged SAE folder (ours or SAELens') is one SAEConfigError naming the folder, before anything is allocated."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae
from experiments.cli import main
from sae.config import SAEConfig
from sae.errors import SAEConfigError
from sae.registry import get_architecture

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, K = 8, 16, 2


@pytest.fixture
def folder(tmp_path):
    model = get_architecture("mutual_choice")(SAEConfig(arch="mutual_choice", d_in=D, n_features=F, k=K), seed=0)
    model.threshold.fill_(0.5)
    model.threshold_initialized.fill_(True)
    return model.save(tmp_path / "mc")


def edit_cfg(folder, change):
    cfg = json.loads((folder / "cfg.json").read_text())
    change(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def load_error(folder) -> str:
    with pytest.raises(SAEConfigError) as info:
        sae.load(folder)
    assert str(folder) in str(info.value)  # every message names the folder
    return str(info.value)


def test_the_undamaged_folder_loads(folder):
    assert float(sae.load(folder).threshold) == 0.5


def test_cfg_that_is_not_json(folder):
    (folder / "cfg.json").write_text('{"architecture": "jumprelu", ')
    assert "cfg.json is not valid JSON" in load_error(folder)


def test_cfg_that_is_a_list(folder):
    (folder / "cfg.json").write_text("[1, 2]")
    assert "must hold a JSON object, found a list" in load_error(folder)


def test_missing_config_key(folder):
    edit_cfg(folder, lambda c: c["workbench"]["config"].pop("n_features"))
    assert "workbench config is incomplete or has unknown keys" in load_error(folder)


def test_absurd_sizes_are_refused_from_the_header_before_allocating(folder):
    """Bug fixed: sae.load built the module cfg.json describes first (10**15 latents: exabytes)."""

    def huge(cfg):
        cfg["workbench"]["config"]["n_features"] = 10**15
        cfg["d_sae"] = 10**15

    edit_cfg(folder, huge)
    message = load_error(folder)
    assert "tensor W_dec has shape (16, 8)" in message and f"n_features={10**15}" in message


def test_top_level_sizes_contradicting_the_workbench_block(folder):
    edit_cfg(folder, lambda c: c.update(d_in=9))
    assert "says d_in=9 at the top level but 8 in its workbench block" in load_error(folder)


def test_wrong_weight_shapes(folder):
    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["W_dec"] = torch.zeros(F + 1, D)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    assert "tensor W_dec has shape (17, 8), but the config (d_in=8, n_features=16) needs (16, 8)" in load_error(folder)


def test_missing_weights_file(folder):
    (folder / "sae_weights.safetensors").unlink()
    assert "sae_weights.safetensors is missing" in load_error(folder)


def test_a_pickle_in_place_of_the_safetensors(folder):
    (folder / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": torch.zeros(D, F)}))
    assert "is not a readable safetensors file" in load_error(folder)
    assert "never pickles" in load_error(folder)


def test_missing_workbench_tensor(folder):
    state = load_file(str(folder / "workbench_state.safetensors"))
    state.pop("threshold")
    save_file(state, str(folder / "workbench_state.safetensors"))
    assert "tensor threshold is missing" in load_error(folder)


def test_non_finite_weights_are_refused(folder):
    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["W_enc"][0, 0] = float("nan")
    save_file(weights, str(folder / "sae_weights.safetensors"))
    assert "holds NaN/inf values in W_enc" in load_error(folder)


def test_saelens_folder_with_absurd_sizes(tmp_path):
    folder = tmp_path / "saelens"
    folder.mkdir()
    tensors = {"W_enc": torch.zeros(D, F), "W_dec": torch.zeros(F, D), "b_enc": torch.zeros(F), "b_dec": torch.zeros(D)}
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": 10**15, "k": 2}))
    assert "SAELens tensor W_enc has shape (8, 16), expected (8, 1000000000000000)" in load_error(folder)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": "eight", "d_sae": F, "k": 2}))
    assert "needs d_in as a positive integer, found 'eight'" in load_error(folder)


def test_saewb_eval_on_a_damaged_folder_is_one_line_and_exit_2(folder, tmp_path, capsys):
    (folder / "cfg.json").write_text("[]")
    code = main(["eval", "--sae", str(folder), "--activations", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("saewb eval: error: ") and "must hold a JSON object" in err


def test_infinite_thresholds_are_a_legitimate_state_not_damage(tmp_path):
    """Regression: a Feature-Choice latent never observed keeps threshold +inf (never fires); calibration can set
    -inf (fires whenever positive). Only the weights must be finite."""
    model = get_architecture("feature_choice")(SAEConfig(arch="feature_choice", d_in=D, n_features=F, k=K), seed=0)
    model.threshold[0], model.threshold[1] = float("inf"), float("-inf")
    model.threshold_initialized.fill_(True)
    loaded = sae.load(model.save(tmp_path / "fc"))
    assert torch.equal(loaded.threshold, model.threshold)
