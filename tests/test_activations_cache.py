"""Writing the activation cache with a tiny model: values, gradients, dtypes, manifest, resume and failures."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BOS_ID

import activations.cache as cache_mod
from activations.cache import CacheConfig, build_cache, next_token_ce_sum
from activations.format import CacheError
from activations.reader import load_cache

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
CONTEXT = 32


@pytest.fixture(autouse=True)
def _datasets_cache(datasets_tmp_cache):
    """Every test here reads the local corpus file; keep datasets' arrow cache in tmp."""


def make_cfg(out: Path, corpus: Path, **overrides) -> CacheConfig:
    """24 contexts of 32 tokens, 4 contexts per batch, 8 per shard: 3 shards of 2 batches each."""
    values = dict(
        model="tiny-test-model",
        hooks=list(HOOKS),
        out=str(out),
        corpus=str(corpus),
        tokens=24 * CONTEXT,
        context=CONTEXT,
        batch_size=4,
        shard_contexts=8,
        seed=0,
    )
    values.update(overrides)
    return CacheConfig(**values)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder but its manifest (which records run timings), by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def direct_rows(model, tokens: np.ndarray, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Full forward pass with run_with_cache over every context, non-BOS positions in row-major order."""
    batch = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    keep = batch != BOS_ID
    with torch.no_grad():
        _, act_cache = model.run_with_cache(batch, names_filter=hooks)
    return {h: act_cache[h].reshape(*batch.shape, -1)[keep] for h in hooks}


class BatchCounter:
    """Wraps ``_run_batch``: counts forward passes and raises KeyboardInterrupt (a kill) on the ``fail_at``-th."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at
        self._real = cache_mod._run_batch
        monkeypatch.setattr(cache_mod, "_run_batch", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self._real(*args, **kwargs)


class ExplodingModel:
    """Stands in for a model that must not be touched."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) although the cache is complete")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, corpus_txt):
    """One uninterrupted build of the default test config, shared as the byte-level reference."""
    import datasets

    out = tmp_path_factory.mktemp("reference") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", out.parent / "hf-datasets")
        manifest = build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    return out, manifest


def without_run_stats(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "last_run"}


# -- values -----------------------------------------------------------------------------------


def test_rows_equal_direct_run_with_cache(reference, tiny_model):
    out, _ = reference
    cache = load_cache(out)
    expected = direct_rows(tiny_model, cache.tokens, HOOKS)
    assert cache.hooks == HOOKS and cache.d_in == 32
    for hook in HOOKS:
        rows = cache.rows(0, cache.n_tokens, hook)
        assert rows.shape == (cache.n_tokens, 32) and rows.dtype == torch.float32
        torch.testing.assert_close(rows, expected[hook], rtol=0, atol=1e-5)
    # hook_z is [batch, pos, head, d_head] flattened head-major: head 2 of a row is columns 16..24.
    ctx, pos = cache.row_index[40]
    with torch.no_grad():
        _, act_cache = tiny_model.run_with_cache(torch.from_numpy(cache.tokens[ctx : ctx + 1].astype(np.int64)))
    torch.testing.assert_close(
        cache.rows(40, 41, HOOKS[1])[0, 16:24], act_cache[HOOKS[1]][0, pos, 2], rtol=0, atol=1e-5
    )


def test_bos_rows_are_excluded(reference):
    out, manifest = reference
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (24, CONTEXT) and tokens.dtype == np.int32
    assert (tokens[:, 0] == BOS_ID).all()
    separators = int((tokens[:, 1:] == BOS_ID).sum())
    assert separators >= 3  # short documents: BOS also sits inside contexts
    n_rows = int((tokens != BOS_ID).sum())
    assert n_rows == 24 * (CONTEXT - 1) - separators
    assert manifest["n_tokens"] == load_cache(out).n_tokens == n_rows
    assert [s["rows"] for s in manifest["shards"]] == [int((tokens[i : i + 8] != BOS_ID).sum()) for i in (0, 8, 16)]


def test_manifest_fields_and_checksums(reference):
    out, manifest = reference
    assert manifest == read_manifest(out)
    assert manifest["format_version"] == 1 and manifest["kind"] == "saewb-activation-cache"
    assert manifest["d_in"] == {"blocks.1.hook_resid_post": 32, "blocks.0.attn.hook_z": 32}
    assert manifest["hooks"] == HOOKS and manifest["n_layers"] == 3 and manifest["bos_token_id"] == BOS_ID
    assert (manifest["n_contexts"], manifest["context"], manifest["n_shards"]) == (24, CONTEXT, 3)
    assert manifest["complete"] is True and manifest["with_grads"] is False and manifest["dtype"] == "float32"
    assert manifest["tokens_sha256"] == hashlib.sha256((out / "tokens.npy").read_bytes()).hexdigest()
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert [s["contexts"] for s in manifest["shards"]] == [[0, 8], [8, 16], [16, 24]]
    listed = set()
    for shard in manifest["shards"]:
        assert set(shard["files"]) == set(HOOKS)
        for hook in HOOKS:
            assert set(shard["files"][hook]) == {"acts"}
            info = shard["files"][hook]["acts"]
            assert info["path"] == f"{hook}/shard_{shard['index']:05d}.acts"
            data = (out / info["path"]).read_bytes()
            assert len(data) == shard["rows"] * 32 * 4
            assert hashlib.sha256(data).hexdigest() == info["sha256"]
            listed.add(info["path"])
    assert set(folder_files(out)) == listed | {"tokens.npy"}  # nothing else: no temp or probe files


def test_default_shard_size(tmp_path, tiny_model, corpus_txt):
    # ~128 MiB of the widest hook per shard, in whole batches: 2**27 // (64 * 4 * 32) = 16384 contexts.
    cfg = make_cfg(tmp_path / "c", corpus_txt, hooks=["blocks.0.mlp.hook_post"], tokens=4 * CONTEXT)
    cfg.shard_contexts = None
    manifest = build_cache(cfg, model=tiny_model, progress=False)
    assert manifest["shard_contexts"] == 16384 and manifest["n_shards"] == 1
    assert manifest["d_in"] == {"blocks.0.mlp.hook_post": 64}
    # A resume without an explicit shard size adopts the cache's own.
    assert build_cache(cfg, model=ExplodingModel(), progress=False)["shard_contexts"] == 16384


# -- gradients --------------------------------------------------------------------------------


def direct_grad(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """d(next_token_ce_sum)/d(activation at one hook), by plain autograd on a leaf at that hook alone."""
    held = {}

    def make_leaf(act, hook):
        held["act"] = act.detach().requires_grad_(True)
        return held["act"]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, make_leaf)])
        next_token_ce_sum(logits, tokens, BOS_ID).backward()
    return held["act"].grad


def test_next_token_ce_sum_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    tokens = torch.randint(0, 11, (3, 7), generator=gen)
    tokens[:, 0] = BOS_ID
    tokens[1, 4] = BOS_ID  # a document boundary: predicting it is no loss
    targets = tokens[:, 1:].clone()
    targets[targets == BOS_ID] = -100
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(next_token_ce_sum(logits, tokens, BOS_ID), expected)
    # Uniform logits: every counted position costs log(vocab).
    n_counted = int((tokens[:, 1:] != BOS_ID).sum())
    uniform = next_token_ce_sum(torch.zeros(3, 7, 11), tokens, BOS_ID)
    assert uniform.item() == pytest.approx(n_counted * np.log(11), rel=1e-6)


def test_with_grads_rows_equal_direct_autograd(tmp_path, tiny_model, corpus_txt):
    hooks = ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"]  # two layers in one backward pass
    cfg = make_cfg(tmp_path / "c", corpus_txt, hooks=hooks, tokens=8 * CONTEXT, with_grads=True)
    manifest = build_cache(cfg, model=tiny_model, progress=False)
    assert manifest["with_grads"] is True and manifest["n_shards"] == 1
    assert set(manifest["shards"][0]["files"][hooks[1]]) == {"acts", "grads"}
    cache = load_cache(tmp_path / "c")
    assert cache.has_grads
    tokens = torch.from_numpy(cache.tokens.astype(np.int64))
    keep = tokens != BOS_ID
    last_position = torch.zeros_like(keep)
    last_position[:, -1] = True
    before_bos = torch.zeros_like(keep)
    before_bos[:, :-1] = tokens[:, 1:] == BOS_ID
    with torch.no_grad():
        _, acts = tiny_model.run_with_cache(tokens, names_filter=hooks)
    for hook in hooks:
        grad = direct_grad(tiny_model, tokens, hook).reshape(*tokens.shape, -1)
        expected = grad[keep]
        stored = cache.rows(0, cache.n_tokens, hook, kind="grads")
        scale = expected.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(stored, expected, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(
            cache.rows(0, cache.n_tokens, hook), acts[hook].reshape(*tokens.shape, -1)[keep], rtol=0, atol=1e-5
        )
        # A position influences the loss only through its own prediction (none at the end of a context, none
        # when the next token is BOS) or, below the last layer, through attention from later positions.
        zero = last_position | before_bos if hook.startswith("blocks.2.") else last_position
        assert before_bos[keep].sum() >= 1
        assert stored[zero[keep]].abs().max().item() == 0.0
        assert (stored[~zero[keep]].norm(dim=1) > 1e-4).all()


# -- storage dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "itemsize", "rel"), [("float16", 2, 2**-11), ("bfloat16", 2, 2**-8)])
def test_half_precision_round_trip(tmp_path, tiny_model, corpus_txt, reference, dtype, itemsize, rel):
    ref_out, _ = reference
    manifest = build_cache(make_cfg(tmp_path / "c", corpus_txt, dtype=dtype), model=tiny_model, progress=False)
    assert manifest["dtype"] == dtype
    info = manifest["shards"][0]["files"][HOOKS[0]]["acts"]
    assert (tmp_path / "c" / info["path"]).stat().st_size == manifest["shards"][0]["rows"] * 32 * itemsize
    half, full = load_cache(tmp_path / "c"), load_cache(ref_out)
    assert half.n_tokens == full.n_tokens
    for hook in HOOKS:
        got, want = half.rows(0, half.n_tokens, hook), full.rows(0, full.n_tokens, hook)
        assert got.dtype == torch.float32
        error = (got - want).abs()
        assert (error <= rel * want.abs() + 1e-6).all()  # within half an ulp of the storage dtype
        assert error.max().item() > 0  # really stored at reduced precision
        torch.testing.assert_close(got, want.to(getattr(torch, dtype)).float(), rtol=0, atol=2 * rel)


def test_float16_overflow_is_refused(tmp_path, tiny_model, corpus_txt, monkeypatch):
    real = cache_mod._run_batch

    def huge(model, tokens, specs, with_grads, bos_id):
        acts, grads = real(model, tokens, specs, with_grads, bos_id)
        return {k: v * 1e6 for k, v in acts.items()}, grads  # finite in float32, inf in float16

    monkeypatch.setattr(cache_mod, "_run_batch", huge)
    cfg = make_cfg(tmp_path / "c", corpus_txt, hooks=[HOOKS[0]], tokens=8 * CONTEXT, dtype="float16")
    with pytest.raises(CacheError) as info:
        build_cache(cfg, model=tiny_model, progress=False)
    assert str(info.value) == (
        "the model produced a NaN/inf activation at hook blocks.1.hook_resid_post in contexts starting at 0; "
        "try --dtype float32 or a float32 model"
    )
    cfg.out, cfg.dtype = str(tmp_path / "c32"), "float32"
    assert build_cache(cfg, model=tiny_model, progress=False)["complete"] is True


# -- resume and reuse -------------------------------------------------------------------------


def test_interrupted_cache_resumes_to_identical_bytes(tmp_path, tiny_model, corpus_txt, reference, monkeypatch):
    ref_out, ref_manifest = reference
    out = tmp_path / "c"
    counter = BatchCounter(monkeypatch, fail_at=3)  # batches 1-2 fill shard 0; the kill lands in shard 1
    with pytest.raises(KeyboardInterrupt):
        build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    partial = read_manifest(out)
    assert partial["complete"] is False and [s["index"] for s in partial["shards"]] == [0]
    assert sorted(folder_files(out)) == sorted(["tokens.npy", *(f"{h}/shard_00000.acts" for h in HOOKS)])
    with pytest.raises(CacheError, match=r"is incomplete \(1/3 shards\)"):
        load_cache(out)

    counter.calls, counter.fail_at = 0, None
    manifest = build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert counter.calls == 4  # only shards 1 and 2 ran
    assert manifest["complete"] is True and manifest["last_run"]["rows"] == sum(
        s["rows"] for s in manifest["shards"][1:]
    )
    assert folder_files(out) == folder_files(ref_out)
    assert manifest["shards"] == ref_manifest["shards"]
    assert without_run_stats(read_manifest(out)) == without_run_stats(ref_manifest)


def test_complete_cache_is_not_recomputed(reference, corpus_txt):
    ref_out, ref_manifest = reference
    before = folder_files(ref_out)
    manifest_bytes = (ref_out / "manifest.json").read_bytes()
    again = build_cache(make_cfg(ref_out, corpus_txt), model=ExplodingModel(), progress=False)
    assert again == ref_manifest
    assert folder_files(ref_out) == before and (ref_out / "manifest.json").read_bytes() == manifest_bytes


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"hooks": ["blocks.2.hook_resid_post"]}, f"hooks: cache has {HOOKS!r}, asked ['blocks.2.hook_resid_post']"),
        ({"tokens": 16 * CONTEXT}, "n_contexts: cache has 24, asked 16"),
        ({"seed": 1}, "seed: cache has 0, asked 1"),
        ({"dtype": "float16"}, "dtype: cache has 'float32', asked 'float16'"),
        ({"shard_contexts": 4}, "shard_contexts: cache has 8, asked 4"),
    ],
)
def test_different_cache_in_same_folder_is_refused(reference, corpus_txt, change, expected):
    ref_out, _ = reference
    before = folder_files(ref_out)
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(ref_out, corpus_txt, **change), model=ExplodingModel(), progress=False)
    assert str(info.value) == (
        f"{ref_out} already holds a different activation cache ({expected}). "
        "Use another --out folder, or delete this one to rebuild it."
    )
    assert folder_files(ref_out) == before


def test_tokens_rounding_to_same_contexts_is_the_same_cache(reference, corpus_txt):
    ref_out, ref_manifest = reference
    # 24 * 32 - 5 tokens still round up to 24 contexts: the same cache, nothing to do.
    manifest = build_cache(
        make_cfg(ref_out, corpus_txt, tokens=24 * CONTEXT - 5), model=ExplodingModel(), progress=False
    )
    assert manifest == ref_manifest


def test_non_empty_folder_without_manifest_is_refused(tmp_path, corpus_txt):
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(out, corpus_txt), model=ExplodingModel(), progress=False)
    assert (
        str(info.value) == f"{out} exists and is not empty, but holds no manifest.json: choose an empty or new folder"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_empty_existing_folder_is_used(tmp_path, tiny_model, corpus_txt):
    out = tmp_path / "c"
    out.mkdir()
    manifest = build_cache(make_cfg(out, corpus_txt, tokens=8 * CONTEXT), model=tiny_model, progress=False)
    assert manifest["complete"] is True and manifest["n_shards"] == 1


def test_bad_manifest_json_and_format(tmp_path, corpus_txt):
    out = tmp_path / "c"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"manifest\.json is not valid JSON \(.*\); delete .* to rebuild$"):
        build_cache(make_cfg(out, corpus_txt), model=ExplodingModel(), progress=False)
    (out / "manifest.json").write_text(json.dumps({"format_version": 0, "shards": []}))
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(out, corpus_txt), model=ExplodingModel(), progress=False)
    assert str(info.value) == f"{out} holds cache format 0, this is 1"


# -- damage -----------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_detected_and_recomputed(tmp_path, tiny_model, corpus_txt, reference, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "c"
    build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    damaged = out / HOOKS[1] / "shard_00001.acts"
    flip_byte(damaged, 1001)
    with pytest.raises(CacheError) as info:
        list(load_cache(out).iter_batches(64, shuffle=False, hook=HOOKS[1]))
    assert str(info.value) == (
        f"shard {damaged} is corrupted (sha256 mismatch); rerun the same `saewb cache` command to recompute it"
    )
    # The other hook's shards are intact and still read.
    assert sum(len(b) for b in load_cache(out).iter_batches(64, hook=HOOKS[0])) == load_cache(out).n_tokens

    counter = BatchCounter(monkeypatch)
    manifest = build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert counter.calls == 2  # only shard 1 (2 batches) was recomputed
    assert manifest["complete"] is True
    assert folder_files(out) == folder_files(ref_out)


def test_missing_shard_is_recomputed(tmp_path, tiny_model, corpus_txt, reference, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "c"
    build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    missing = out / HOOKS[0] / "shard_00002.acts"
    missing.unlink()
    with pytest.raises(CacheError) as info:
        load_cache(out).rows(0, 10**6, HOOKS[0])
    assert str(info.value) == f"shard file {missing} is missing; rerun the same `saewb cache` command to recompute it"
    counter = BatchCounter(monkeypatch)
    build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert counter.calls == 2 and folder_files(out) == folder_files(ref_out)


def test_damaged_tokens_file_is_refused_on_resume(tmp_path, tiny_model, corpus_txt, monkeypatch):
    out = tmp_path / "c"
    counter = BatchCounter(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    counter.fail_at = None
    flip_byte(out / "tokens.npy", 200)
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert str(info.value) == f"{out / 'tokens.npy'} fails its checksum; delete {out} to rebuild the cache"


# -- disk full and unwritable folders ---------------------------------------------------------


def test_disk_full_keeps_complete_shards_and_resumes(tmp_path, tiny_model, corpus_txt, reference, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "c"
    real_write = cache_mod.atomic_write_bytes
    attempts = []

    def disk_full_on_second_shard(path, data):
        path = Path(path)
        attempts.append(str(path.relative_to(out)))
        if path.name == "shard_00001.acts" and path.parent.name == HOOKS[1]:
            # The first hook's file of this shard is already written; this one dies half-way.
            with monkeypatch.context() as mp:

                def no_space(fd):
                    raise OSError(errno.ENOSPC, "No space left on device")

                mp.setattr(os, "fsync", no_space)
                real_write(path, data)
        return real_write(path, data)

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", disk_full_on_second_shard)
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert str(info.value) == (
        f"could not write shard 1 to {out}: the disk is full. The partial shard was removed; "
        "1 complete shard(s) are kept. Free space and rerun the same command to resume."
    )
    assert attempts == [
        "tokens.npy",
        *(f"{h}/shard_00000.acts" for h in HOOKS),
        *(f"{h}/shard_00001.acts" for h in HOOKS),
    ]
    # No trace of shard 1 (neither the first hook's complete file nor a temp file), and shard 2 never started.
    assert sorted(folder_files(out)) == sorted(["tokens.npy", *(f"{h}/shard_00000.acts" for h in HOOKS)])
    manifest = read_manifest(out)
    assert [s["index"] for s in manifest["shards"]] == [0] and manifest["complete"] is False
    assert manifest["shards"][0] == read_manifest(ref_out)["shards"][0]

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", real_write)
    assert build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)["complete"] is True
    assert folder_files(out) == folder_files(ref_out)
    assert read_manifest(out)["shards"] == read_manifest(ref_out)["shards"]


def test_disk_full_while_writing_the_manifest(tmp_path, tiny_model, corpus_txt, reference, monkeypatch):
    ref_out, _ = reference
    out = tmp_path / "c"
    real_json = cache_mod.atomic_write_json

    def full_after_shard_1(path, obj):
        if [s["index"] for s in obj.get("shards", [])] == [0, 1]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_json(path, obj)

    monkeypatch.setattr(cache_mod, "atomic_write_json", full_after_shard_1)
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert "the disk is full. The partial shard was removed; 1 complete shard(s) are kept." in str(info.value)
    assert [s["index"] for s in read_manifest(out)["shards"]] == [0]
    assert not list(out.rglob("shard_00001.*"))
    monkeypatch.setattr(cache_mod, "atomic_write_json", real_json)
    build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert folder_files(out) == folder_files(ref_out)


def test_other_write_errors_name_their_reason(tmp_path, tiny_model, corpus_txt, monkeypatch):
    real_write = cache_mod.atomic_write_bytes

    def read_only(path, data):
        if Path(path).name.startswith("shard_"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write(path, data)

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", read_only)
    out = tmp_path / "c"
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert str(info.value).startswith(f"could not write shard 0 to {out}: Read-only file system. ")
    assert "0 complete shard(s) are kept" in str(info.value)


def test_output_under_a_regular_file(tmp_path, corpus_txt):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(blocker / "cache", corpus_txt), model=ExplodingModel(), progress=False)
    assert str(info.value) == f"cannot write to output folder {blocker / 'cache'}: Not a directory"


def test_output_is_a_regular_file(tmp_path, corpus_txt):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CacheError) as info:
        build_cache(make_cfg(blocker, corpus_txt), model=ExplodingModel(), progress=False)
    assert str(info.value) == f"cannot write to output folder {blocker}: File exists"
    assert blocker.read_text() == "x"


# -- argument validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "float8"}, "unknown dtype 'float8'; allowed: float32, float16, bfloat16"),
        ({"tokens": 31}, "--tokens 31 is smaller than one context of 32 tokens; ask for at least 32"),
        ({"context": 1, "tokens": 100}, "--context must be at least 2 (BOS plus one token); got 1"),
        ({"batch_size": 0}, "--batch-size must be a positive number of contexts; got 0"),
        ({"shard_contexts": 0}, "shard size must be a positive number of contexts; got 0"),
    ],
)
def test_config_validation(tmp_path, corpus_txt, change, message):
    cfg = make_cfg(tmp_path / "c", corpus_txt, **change)
    with pytest.raises(CacheError) as info:
        cfg.validate()
    assert str(info.value) == message
    with pytest.raises(CacheError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        build_cache(cfg, model=ExplodingModel(), progress=False)
    assert not (tmp_path / "c").exists()  # refused before anything is created


def test_kill_after_tokens_before_manifest_starts_afresh(tmp_path, tiny_model, corpus_txt, reference):
    """A kill between writing tokens.npy and the first manifest leaves no manifest: the rerun must not refuse."""
    ref_out, ref_manifest = reference
    out = tmp_path / "cache"
    out.mkdir()
    (out / "tokens.npy").write_bytes(b"half-written tokens")
    (out / ".tokens.npy.abc.tmp").write_bytes(b"temp")
    build_cache(make_cfg(out, corpus_txt), model=tiny_model, progress=False)
    assert folder_files(out) == folder_files(ref_out)
    assert without_run_stats(read_manifest(out)) == without_run_stats(ref_manifest)


def test_nan_gradient_is_refused(tmp_path, tiny_model, corpus_txt, monkeypatch):
    real = cache_mod._run_batch

    def nan_grads(model, tokens, specs, with_grads, bos_id):
        acts, grads = real(model, tokens, specs, with_grads, bos_id)
        return acts, {k: torch.full_like(v, float("nan")) for k, v in grads.items()}

    monkeypatch.setattr(cache_mod, "_run_batch", nan_grads)
    cfg = make_cfg(tmp_path / "c", corpus_txt, hooks=[HOOKS[0]], tokens=8 * CONTEXT, with_grads=True)
    with pytest.raises(CacheError) as info:
        build_cache(cfg, model=tiny_model, progress=False)
    assert str(info.value) == (
        "the model produced a NaN/inf gradient at hook blocks.1.hook_resid_post in contexts starting at 0; "
        "try --dtype float32 or a float32 model"
    )
    assert read_manifest(tmp_path / "c")["shards"] == []


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    """Bug fixed: atomic writes left every cache file at mkstemp's 0600, whatever the umask, so other ranks or
    users on shared storage could not read them."""
    from activations.storage import atomic_write_bytes

    before = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(before)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask
