"""Save/load round trips and the SAELens 6.x folder format (cfg.json + sae_weights.safetensors)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae
from sae.errors import SAEConfigError
from sae.io import (
    SAELENS_ARCH_CFG_FIELDS,
    SAELENS_CFG_FIELDS,
    SAELENS_NORMALIZE_ACTIVATIONS,
    SAELENS_WEIGHT_SHAPES,
)
from sae.synthetic import planted_dictionary_data

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster and repeatably on one thread

D, F, K = 16, 48, 3
VARIANTS = {
    "topk": dict(arch="topk"),
    "mutual_choice": dict(arch="mutual_choice"),
    "feature_choice": dict(arch="feature_choice", fc_capacity="zipf"),
    "gradient_topk": dict(arch="gradient_topk"),
    "topk_per_token": dict(arch="topk", normalization="per_token_standardize"),
    "mutual_choice_none": dict(arch="mutual_choice", normalization="none"),
}


@pytest.fixture(scope="module")
def data():
    planted = planted_dictionary_data(4096, D, 32, K, seed=1)
    acts = 10.0 * planted.acts + 2.0  # off-centre and large, so c != 1 and b_pre matters
    grads = torch.randn(acts.shape, generator=torch.Generator().manual_seed(2))
    return acts, grads


@pytest.fixture(scope="module")
def models(data):
    acts, grads = data
    out = {}
    for name, options in VARIANTS.items():
        out[name] = sae.train(
            acts,
            grads=grads if options["arch"] == "gradient_topk" else None,
            n_features=F,
            k=K,
            batch_size=256,
            total_tokens=256 * 30,
            progress=False,
            metadata={"hook_name": "blocks.2.hook_resid_post"},
            **options,
        )
    return out


def saelens_reference(folder, x):
    """SAELens' inference computation, written from its format (not from our code)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    sae_in, mu, std = x, None, None
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)
        sae_in = centred / (std + 1e-5)
    if cfg["apply_b_dec_to_input"]:
        sae_in = sae_in - w["b_dec"]
    hidden = sae_in @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if cfg["architecture"] == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            hidden = hidden * norms
        top = hidden.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
    else:
        acts = hidden.relu() * (hidden > w["threshold"].relu())
    decoded = acts / norms if cfg.get("rescale_acts_by_decoder_norm") else acts  # rescaling lives in decode
    out = decoded @ w["W_dec"] + w["b_dec"]
    if mu is not None:
        out = out * std + mu
    return acts, out


@pytest.mark.parametrize("name", VARIANTS)
def test_save_then_load_gives_identical_outputs(models, data, tmp_path, name):
    model = models[name]
    model.save(tmp_path)
    loaded = sae.load(tmp_path)
    x, g = data[0][:500], data[1][:500]
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    z = model.encode(x)
    assert torch.equal(loaded.encode(x), z)
    assert torch.equal(loaded.decode(z, x), model.decode(z, x))
    assert torch.equal(loaded.encode(x, g), model.encode(x, g))
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.metadata == {"hook_name": "blocks.2.hook_resid_post"}
    assert loaded.training_info == json.loads(json.dumps(model.training_info))


@pytest.mark.parametrize("name", VARIANTS)
def test_saved_folder_has_saelens_fields_names_shapes_and_dtypes(models, tmp_path, name):
    model = models[name]
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    arch = cfg["architecture"]
    assert arch == {"topk": "topk", "gradient_topk": "topk"}.get(model.arch, "jumprelu")
    assert set(SAELENS_CFG_FIELDS) | set(SAELENS_ARCH_CFG_FIELDS[arch]) <= set(cfg)
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, F, "float32", "cpu")
    assert cfg["normalize_activations"] in SAELENS_NORMALIZE_ACTIVATIONS
    assert cfg["normalize_activations"] == ("layer_norm" if name == "topk_per_token" else "none")
    assert cfg["apply_b_dec_to_input"] is True and cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["workbench"]["config"]["arch"] == model.arch and cfg["workbench"]["format_version"] == 1
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(weights) == set(SAELENS_WEIGHT_SHAPES[arch])
    assert weights["W_enc"].shape == (D, F) and weights["W_dec"].shape == (F, D)
    assert weights["b_enc"].shape == (F,) and weights["b_dec"].shape == (D,)
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_thresholds_are_exported_broadcast_for_mc_and_per_feature_for_fc(models, tmp_path):
    mc, fc = models["mutual_choice"], models["feature_choice"]
    mc.save(tmp_path / "mc")
    fc.save(tmp_path / "fc")
    mc_threshold = load_file(str(tmp_path / "mc" / "sae_weights.safetensors"))["threshold"]
    fc_threshold = load_file(str(tmp_path / "fc" / "sae_weights.safetensors"))["threshold"]
    assert mc_threshold.shape == (F,) and torch.equal(mc_threshold, (mc.threshold / mc.norm_scale).expand(F))
    assert torch.equal(fc_threshold, fc.threshold / fc.norm_scale)
    assert fc_threshold.unique().numel() > F // 2  # genuinely per feature


@pytest.mark.parametrize("name", VARIANTS)
def test_saelens_computation_on_the_exported_tensors_matches_ours(models, data, tmp_path, name):
    model = models[name]
    model.save(tmp_path)
    x = data[0][:500]
    acts, out = saelens_reference(tmp_path, x)
    ours = model(x)
    assert (model.norm_scale != 1).item() == model.cfg.normalization.startswith("scalar")
    assert torch.allclose(out, ours, rtol=1e-4, atol=1e-4 * x.abs().max().item())
    scale = model.norm_scale if model.cfg.normalization == "scalar" else 1.0
    assert torch.allclose(acts, model.encode(x) / scale, rtol=1e-4, atol=1e-5)


def write_saelens_folder(folder, cfg, weights):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


def saelens_weights(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D, F, generator=g),
        "W_dec": torch.randn(F, D, generator=g) * 0.3,  # SAELens decoders need not be unit norm
        "b_enc": torch.randn(F, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g),
    }
    if arch == "jumprelu":
        w["threshold"] = torch.rand(F, generator=g) * 2
    return w


@pytest.mark.parametrize(
    "cfg_extra",
    [
        {"architecture": "topk", "k": 5},
        {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True},
        {"architecture": "topk", "k": 5, "normalize_activations": "layer_norm"},
        {"architecture": "jumprelu"},
        {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    ],
)
def test_loads_saelens_saved_folders(tmp_path, cfg_extra):
    cfg = {
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"},
        **cfg_extra,
    }
    write_saelens_folder(tmp_path, cfg, saelens_weights(cfg["architecture"]))
    loaded = sae.load(tmp_path)
    x = 3 * torch.randn(200, D, generator=torch.Generator().manual_seed(9))
    acts, out = saelens_reference(tmp_path, x)
    assert loaded.arch == cfg["architecture"]
    assert loaded.metadata == {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}
    assert torch.allclose(loaded.encode(x), acts, rtol=1e-5, atol=1e-5)
    assert torch.allclose(loaded(x), out, rtol=1e-5, atol=1e-4)
    assert (loaded.encode(x) > 0).sum().item() > 0


def test_hook_z_sae_is_marked_for_saelens_reshaping(models, tmp_path):
    model = models["topk"]
    model.metadata = {"hook_name": "blocks.4.attn.hook_z"}
    try:
        model.save(tmp_path)
    finally:
        model.metadata = {"hook_name": "blocks.2.hook_resid_post"}
    assert json.loads((tmp_path / "cfg.json").read_text())["reshape_activations"] == "hook_z"


def test_unsupported_or_malformed_folders_give_clear_errors(tmp_path):
    base = {"d_in": D, "d_sae": F, "dtype": "float32", "normalize_activations": "none"}
    write_saelens_folder(tmp_path / "gated", {**base, "architecture": "gated"}, saelens_weights("topk"))
    with pytest.raises(SAEConfigError, match="'gated' is not supported; loadable: topk, jumprelu"):
        sae.load(tmp_path / "gated")
    bad = saelens_weights("topk")
    bad["W_enc"] = bad["W_enc"].T.contiguous()
    write_saelens_folder(tmp_path / "shape", {**base, "architecture": "topk", "k": 4}, bad)
    with pytest.raises(SAEConfigError, match=r"W_enc has shape \(48, 16\), expected \(16, 48\) \[d_in, d_sae\]"):
        sae.load(tmp_path / "shape")
    write_saelens_folder(
        tmp_path / "norm",
        {**base, "architecture": "topk", "k": 4, "normalize_activations": "constant_norm_rescale"},
        saelens_weights("topk"),
    )
    with pytest.raises(SAEConfigError, match="constant_norm_rescale"):
        sae.load(tmp_path / "norm")
    with pytest.raises(SAEConfigError, match="cfg.json is missing"):
        sae.load(tmp_path / "nothing")


def test_newer_workbench_format_is_refused(models, tmp_path):
    models["topk"].save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["workbench"]["format_version"] = 99
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match="format_version 99"):
        sae.load(tmp_path)
