"""sae.load("RELEASE/SAE_ID") through SAELens' registry (issue 14), offline: a stand-in sae_lens package holding only
its pretrained_saes.yaml, and a Hugging Face cache laid out by huggingface_hub's conventions."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

import sae
from sae.errors import SAEConfigError, SAEDataError
from sae.pretrained import is_pretrained_name, resolve
from tests.conftest import folder_analyze_reads, put_in_cache, tiny_hub_sae

D_IN, D_SAE = 8, 16
REGISTRY = """
SAE_LOOKUP:
  tiny-res-jb:
    repo_id: org/tiny-res-saes
    model: fake-model
    conversion_func:
    saes:
      - id: blocks.1.hook_resid_pre
        path: blocks.1.hook_resid_pre
        l0: 10.0
  gemma-scope-tiny-res-canonical:
    repo_id: google/gemma-scope-tiny-pt-res
    model: gemma-2-2b
    conversion_func: gemma_2
    saes:
      - id: layer_3/width_16/canonical
        path: layer_3/width_16/average_l0_5
  tiny-hook-z-kk:
    repo_id: org/attn-saes
    model: gpt2-small
    conversion_func: connor_rob_hook_z
    saes:
      - id: blocks.0.hook_z
        path: some_file.pt
"""


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A package named sae_lens on sys.path whose only content is the registry file."""
    package = tmp_path / "site" / "sae_lens"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pretrained_saes.yaml").write_text(REGISTRY)
    monkeypatch.syspath_prepend(str(package.parent))
    importlib.invalidate_caches()
    return package


@pytest.fixture
def weights():
    gen = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen), "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
            "b_enc": torch.randn(D_SAE, generator=gen), "b_dec": torch.randn(D_IN, generator=gen)}


def standard_folder_files(weights) -> dict[str, bytes]:
    """A SAELens `standard` (ReLU) SAE folder as the res-jb releases store it."""
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "model_name": "fake-model", "hook_point": "blocks.1.hook_resid_pre"}
    return {"blocks.1.hook_resid_pre/cfg.json": json.dumps(cfg).encode(),
            "blocks.1.hook_resid_pre/sae_weights.safetensors": save(weights)}


def npz_bytes(arrays: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in arrays.items()})
    return buf.getvalue()


def test_a_saelens_standard_release_loads_as_a_relu_sae(registry, hf_cache, weights):
    put_in_cache(hf_cache, "org/tiny-res-saes", standard_folder_files(weights))
    model = sae.load("tiny-res-jb/blocks.1.hook_resid_pre")
    assert model.cfg.arch == "relu" and model.metadata["hook_name"] == "blocks.1.hook_resid_pre"
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))
    w = {k: v.double() for k, v in weights.items()}
    want = torch.relu((x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # SAELens StandardSAE.encode
    torch.testing.assert_close(model.encode(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.decode(model.encode(x)).double(), want @ w["W_dec"] + w["b_dec"],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(SAEConfigError, match="inference-only"):
        model.select_train(torch.zeros(1, D_SAE), None)


def test_gemma_scope_is_converted_once_into_a_jumprelu_folder(registry, hf_cache, weights, isolated_cache_root):
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2))
    put_in_cache(hf_cache, "google/gemma-scope-tiny-pt-res",
                 {"layer_3/width_16/average_l0_5/params.npz": npz_bytes({**weights, "threshold": threshold})})
    name = "gemma-scope-tiny-res-canonical/layer_3/width_16/canonical"
    model = sae.load(name)
    assert model.cfg.arch == "jumprelu" and not model.cfg.apply_b_dec_to_input
    assert model.metadata["hook_name"] == "blocks.3.hook_resid_post" and model.metadata["model_name"] == "gemma-2-2b"
    x = 2 * torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    w = {k: v.double() for k, v in weights.items()}
    pre = x.double() @ w["W_enc"] + w["b_enc"]  # Gemma Scope: no b_dec subtracted before the encoder
    want = torch.relu(pre) * (pre > threshold.double())
    torch.testing.assert_close(model.encode(x).double(), want, rtol=1e-5, atol=1e-5)
    converted = isolated_cache_root / "pretrained" / "gemma-scope-tiny-res-canonical" / "layer_3/width_16/canonical"
    stamp = (converted / "sae_weights.safetensors").stat().st_mtime_ns
    sae.load(name)
    assert (converted / "sae_weights.safetensors").stat().st_mtime_ns == stamp  # converted once, then reused


@pytest.mark.parametrize(("name", "says"), [
    ("tiny-res/blocks.1.hook_resid_pre", "'tiny-res' is not a SAELens release; nearest releases: tiny-res-jb"),
    ("tiny-res-jb/blocks.1.hook_resid_post", "has no SAE 'blocks.1.hook_resid_post'; nearest: blocks.1.hook_resid_pre"),
    ("tiny-hook-z-kk/blocks.0.hook_z", "stores its SAEs in the 'connor_rob_hook_z' format, which is not converted"),
])
def test_bad_names_are_one_line_errors_naming_what_exists(registry, hf_cache, name, says):
    with pytest.raises(SAEConfigError) as info:
        sae.load(name)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_an_uncached_release_offline_says_it_needs_the_network(registry, hf_cache):
    with pytest.raises(SAEDataError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        sae.load("tiny-res-jb/blocks.1.hook_resid_pre")


def test_without_sae_lens_the_name_is_refused_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SAEConfigError, match="needs the sae_lens package.*pip install sae-lens"):
        sae.load("gpt2-small-res-jb/blocks.8.hook_resid_pre")


def test_a_local_folder_of_the_same_path_wins(registry, tmp_path, monkeypatch):
    local = tmp_path / "tiny-res-jb" / "blocks.1.hook_resid_pre"
    tiny_hub_sae(local)
    monkeypatch.chdir(tmp_path)
    assert not is_pretrained_name("tiny-res-jb/blocks.1.hook_resid_pre")
    assert sae.load("tiny-res-jb/blocks.1.hook_resid_pre").cfg.arch == "topk"
    assert resolve("tiny-res-jb/blocks.1.hook_resid_pre").repo_id == "org/tiny-res-saes"
    assert not is_pretrained_name("hf://org/repo") and not is_pretrained_name("just-a-name")


def test_analyze_reads_a_release_name_from_its_folder(registry, hf_cache, weights, monkeypatch):
    put_in_cache(hf_cache, "org/tiny-res-saes", standard_folder_files(weights))
    folder = folder_analyze_reads(monkeypatch, "tiny-res-jb/blocks.1.hook_resid_pre")
    assert folder.is_dir() and (folder / "cfg.json").is_file()
    assert sae.load(folder).cfg.arch == "relu"

