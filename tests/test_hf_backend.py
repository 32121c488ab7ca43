"""The hf activations backend (issue 14): a plain transformers model hooked by module name, against the
transformer_lens path on the same local Llama folder (RMSNorm: TL's weight processing leaves the residual
stream, the MLP output and the heads' outputs unchanged, so they agree to float tolerance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BOS_ID

import sae as sae_lib
from activations import CacheConfig, CacheError, build_cache, load_cache, load_model
from activations.hf_backend import HFHookedModel, backend_of_hook
from activations.hooks import HookError, expand_hooks, resolve_hooks
from activations.models import ModelLoadError
from experiments.analysis.geometry import logit_lens
from experiments.analysis.store import AnalysisStore
from experiments.cli import main
from experiments.evaluation import model_in_the_loop, restart_layer
from experiments.steering import generate_continuations

CONTEXT = 16


@pytest.fixture(autouse=True)
def _isolated(isolated_cache_root, datasets_tmp_cache):
    pass


@pytest.fixture(scope="module")
def hf(tiny_hf_folder):
    return load_model(str(tiny_hf_folder), backend="hf")


@pytest.fixture(scope="module")
def tl(tiny_hf_folder):
    return load_model(str(tiny_hf_folder))


def tokens(seed: int = 0, n: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 20, (n, CONTEXT), generator=gen)
    x[:, 0] = BOS_ID
    return x


PAIRS = (  # hf module path, transformer_lens hook: the same activation
    ("model.layers.1", "blocks.1.hook_resid_post"),
    ("model.layers.0", "blocks.0.hook_resid_post"),
    ("model.layers.1.mlp", "blocks.1.hook_mlp_out"),
    ("model.layers.1.self_attn.o_proj:input", "blocks.1.attn.hook_z"),
)


@pytest.mark.parametrize(("module", "hook"), PAIRS)
def test_hf_activations_equal_transformer_lens_ones_for_an_rmsnorm_model(hf, tl, module, hook):
    x = tokens()
    _, ours = hf.run_with_cache(x, names_filter=[module])
    _, theirs = tl.run_with_cache(x, names_filter=[hook])
    a, b = ours[module], theirs[hook].reshape(ours[module].shape)
    assert a.shape == (3, CONTEXT, b.shape[-1])
    # fp32 rounding of two algebraically equal computations (TL folds the norms and centres the weights) is relative
    # to the tensor's scale (rms ~7 in the residual stream), not to each element: a small entry can differ by 2e-5
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.pow(2).mean().sqrt()))


def test_hf_logits_equal_transformer_lens_log_probs(hf, tl):
    """TL centres the unembedding (logits shift by a constant per position): log-probs agree, logits need not."""
    x = tokens(1)
    torch.testing.assert_close(hf(x).log_softmax(-1), tl(x).log_softmax(-1), rtol=1e-4, atol=1e-5)
    assert isinstance(hf, HFHookedModel) and restart_layer(hf, "model.layers.1") is None  # whole forwards


def test_a_cache_only_forward_stops_after_the_last_hooked_module(hf):
    seen: list[str] = []
    handles = [hf.hf.model.layers[1].register_forward_hook(lambda m, a, o: seen.append("block 1")),
               hf.hf.lm_head.register_forward_hook(lambda m, a, o: seen.append("unembed"))]
    try:
        out = hf.run_with_hooks(tokens(), fwd_hooks=[("model.layers.0", lambda act, hook: None)], return_type=None)
        assert out is None and seen == []  # block 1 and the unembedding never ran
        hf.run_with_hooks(tokens(), fwd_hooks=[("model.layers.0", lambda act, hook: None)])
        assert seen == ["block 1", "unembed"]
    finally:
        for handle in handles:
            handle.remove()


def test_a_hook_that_returns_a_tensor_replaces_the_activation(hf):
    x = tokens(2)
    zeroed = hf.run_with_hooks(x, fwd_hooks=[("model.layers.1", lambda act, hook: torch.zeros_like(act))])
    bias_only = hf.hf.lm_head(hf.hf.model.norm(torch.zeros(3, CONTEXT, hf.cfg.d_model)))
    torch.testing.assert_close(zeroed, bias_only)


def test_patterns_expand_in_module_order_and_skip_input_points_unless_asked(hf, tl):
    assert expand_hooks(hf, ["model.layers.*.mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert expand_hooks(hf, ["model.layers.?.self_attn.o_proj:input"]) == [
        "model.layers.0.self_attn.o_proj:input", "model.layers.1.self_attn.o_proj:input"]
    assert expand_hooks(tl, ["blocks.*.hook_resid_post"]) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    specs = resolve_hooks(hf, ["model.layers.*.mlp", "model.layers.1"])
    assert [(s.name, s.d_in) for s in specs] == [("model.layers.0.mlp", 32), ("model.layers.1.mlp", 32),
                                                ("model.layers.1", 32)]


def test_bad_module_names_and_patterns_are_refused_with_what_exists(hf):
    with pytest.raises(HookError, match=r"unknown module 'model.layers.1.mlpp' .*nearest: model.layers.1.mlp"):
        resolve_hooks(hf, ["model.layers.1.mlpp"])
    with pytest.raises(HookError, match=r"the pattern 'model.blocks.\*' matches no hook"):
        resolve_hooks(hf, ["model.blocks.*"])
    with pytest.raises(HookError, match=r"matches hooks of different widths: .*model.layers.0.mlp.up_proj \(64\)"):
        resolve_hooks(hf, ["model.layers.0.mlp.*"])
    assert expand_hooks(hf, ["model.layers.*"]) == ["model.layers.0", "model.layers.1"]  # * stays in one segment
    with pytest.raises(ModelLoadError, match="unknown backend 'nnsight'; allowed: transformer_lens, hf"):
        load_model("x", backend="nnsight")


def test_hf_cache_matches_the_transformer_lens_cache_and_records_the_backend(tiny_hf_folder, corpus_txt, tmp_path):
    common = dict(model=str(tiny_hf_folder), corpus=str(corpus_txt), tokens=8 * CONTEXT, context=CONTEXT,
                  batch_size=4)
    build_cache(CacheConfig(hooks=["model.layers.*"], backend="hf", out=str(tmp_path / "hf"), **common),
                progress=False)
    build_cache(CacheConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                            out=str(tmp_path / "tl"), **common), progress=False)
    ours, theirs = load_cache(tmp_path / "hf"), load_cache(tmp_path / "tl")
    assert ours.manifest["backend"] == "hf" and theirs.manifest["backend"] == "transformer_lens"
    assert ours.hooks == ["model.layers.0", "model.layers.1"]  # the manifest lists what the pattern matched
    assert np.array_equal(np.asarray(ours.tokens), np.asarray(theirs.tokens))
    for layer in (0, 1):
        a = ours.rows(0, ours.n_tokens, hook=f"model.layers.{layer}")
        b = theirs.rows(0, theirs.n_tokens, hook=f"blocks.{layer}.hook_resid_post")
        torch.testing.assert_close(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)),
                                   rtol=1e-4, atol=1e-4)  # float32 sums in another order
    # A resume with the other backend is refused, naming it.
    with pytest.raises(CacheError, match="backend: cache has 'hf', asked 'transformer_lens'"):
        build_cache(CacheConfig(hooks=["model.layers.0", "model.layers.1"], out=str(tmp_path / "hf"), **common),
                    progress=False)


def test_hf_cache_with_gradients_equals_the_transformer_lens_gradients(tiny_hf_folder, corpus_txt, tmp_path):
    common = dict(model=str(tiny_hf_folder), corpus=str(corpus_txt), tokens=4 * CONTEXT, context=CONTEXT,
                  batch_size=4, with_grads=True)
    build_cache(CacheConfig(hooks=["model.layers.0"], backend="hf", out=str(tmp_path / "hf"), **common),
                progress=False)
    build_cache(CacheConfig(hooks=["blocks.0.hook_resid_post"], out=str(tmp_path / "tl"), **common), progress=False)
    ours, theirs = load_cache(tmp_path / "hf"), load_cache(tmp_path / "tl")
    a = np.asarray(ours.rows(0, ours.n_tokens, kind="grads"))
    b = np.asarray(theirs.rows(0, theirs.n_tokens, kind="grads"))
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_ce_with_a_splice_is_the_same_on_both_backends(hf, tl):
    x = tokens(3).numpy()
    half = lambda rows: 0.5 * rows  # noqa: E731
    ours = model_in_the_loop(hf, resolve_hooks(hf, ["model.layers.1"])[0], half, x, BOS_ID)
    theirs = model_in_the_loop(tl, resolve_hooks(tl, ["blocks.1.hook_resid_post"])[0], half, x, BOS_ID)
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "kl_div"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_backend_is_read_from_the_hook_name():
    assert backend_of_hook("blocks.6.hook_resid_post") == "transformer_lens"
    assert backend_of_hook("blocks.6.attn.hook_z") == "transformer_lens"
    assert backend_of_hook("model.layers.6") == "hf"
    assert backend_of_hook("model.layers.6.self_attn.o_proj:input") == "hf"


def test_saewb_cache_backend_flag_and_its_bad_value(tiny_hf_folder, corpus_txt, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["cache", "--model", str(tiny_hf_folder), "--backend", "hf", "--hooks", "model.layers.1.mlp",
                 "--corpus", str(corpus_txt), "--tokens", str(2 * CONTEXT), "--context", str(CONTEXT), "--out",
                 str(out), "--quiet"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "hf" and manifest["hooks"] == ["model.layers.1.mlp"]
    assert manifest["d_in"] == {"model.layers.1.mlp": 32}
    code = main(["cache", "--model", str(tiny_hf_folder), "--backend", "nnsight", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown --backend 'nnsight'; allowed: transformer_lens, hf" in err
    assert err.count("\n") == 1 and not (tmp_path / "d").exists()


def test_train_eval_and_steer_an_sae_on_the_hf_backend(tiny_hf_folder, corpus_txt, tmp_path, capsys):
    """An SAE trained on a hf cache is evaluated (CE/KL with the splice) and steered on the hf model: the
    model is loaded on the backend its hook name belongs to; its CE numbers equal those of the same SAE
    spliced into the transformer_lens model at the matching hook."""
    common = dict(model=str(tiny_hf_folder), corpus=str(corpus_txt), context=CONTEXT, batch_size=8, backend="hf",
                  hooks=["model.layers.1"])
    build_cache(CacheConfig(out=str(tmp_path / "train"), tokens=64 * CONTEXT, **common), progress=False)
    build_cache(CacheConfig(out=str(tmp_path / "eval"), tokens=8 * CONTEXT, skip_contexts=64, **common),
                progress=False)
    code = main(["train", "--activations", str(tmp_path / "train"), "--n-features", "64", "--k", "4",
                 "--batch-size", "256", "--total-tokens", "1024", "--out", str(tmp_path / "run"), "--no-wandb",
                 "--no-progress", "--norm-estimation-batches", "2"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main(["eval", "--sae", str(tmp_path / "run"), "--activations", str(tmp_path / "eval"), "--json",
                 "--model", str(tiny_hf_folder), "--tokens", str(4 * CONTEXT)])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["hook"] == "model.layers.1" and 0 < result["kl_div"] and result["ce_loss_recovered"] < 1
    tl = load_model(str(tiny_hf_folder))
    model_sae = sae_lib.load(tmp_path / "run")
    tokens_ = np.asarray(load_cache(tmp_path / "eval").tokens[:4])
    theirs = model_in_the_loop(tl, resolve_hooks(tl, ["blocks.1.hook_resid_post"])[0], model_sae, tokens_, BOS_ID)
    assert result["ce_loss_sae"] == pytest.approx(theirs["ce_loss_sae"], rel=1e-4)
    code = main(["steer", "--sae", str(tmp_path / "run"), "--features", "0", "--coefficients", "0,4", "--json",
                 "--contexts", "2", "--context-length", "16", "--new-tokens", "3", "--corpus", str(corpus_txt)])
    out, err = capsys.readouterr()
    assert code == 0, err
    sweep = json.loads(out)["sweep"]
    assert sweep[0]["kl"] == 0.0 and sweep[0]["delta_ce"] == 0.0 and sweep[1]["kl"] > 0
    code = main(["analyze", "--sae", str(tmp_path / "run"), "--activations", str(tmp_path / "eval"), "--out",
                 str(tmp_path / "store"), "--top-n", "2", "--quiet", "--name", "hf"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cannot load" not in out  # the hf model was loaded from the cache's manifest: logit lens and strings
    live = next(i for i in range(64) if AnalysisStore(tmp_path / "store").feature("hf", i)["top_contexts"])
    card = AnalysisStore(tmp_path / "store").feature("hf", live)
    assert card["logit_top"] and all(isinstance(t, str) for t in card["top_contexts"][0]["tokens"])


def test_generation_with_the_hf_kv_cache_equals_the_transformer_lens_one(hf, tl):
    prompt = tokens(4, n=1)
    ours = generate_continuations(hf, prompt, [], 2, 6, 0.0, 1.0, 0, [0])
    theirs = generate_continuations(tl, prompt, [], 2, 6, 0.0, 1.0, 0, [0])
    assert ours == theirs and len(ours[0]) == 6


@pytest.mark.parametrize(("module", "hook"), [("model.layers.1.self_attn.o_proj:input", "blocks.1.attn.hook_z"),
                                              ("model.layers.1", "blocks.1.hook_resid_post")])
def test_logit_lens_of_hf_rows_equals_the_transformer_lens_one(hf, tl, module, hook):
    """Up to TL's centred unembedding (a constant per row over the vocabulary)."""
    w_dec = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    ours = logit_lens(w_dec, module, hf) @ hf.W_U.float()
    theirs = logit_lens(w_dec, hook, tl) @ tl.W_U.float()
    torch.testing.assert_close(ours - ours.mean(-1, keepdim=True), theirs - theirs.mean(-1, keepdim=True),
                               rtol=1e-4, atol=1e-4)
