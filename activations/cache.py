"""Writing the sharded, resumable on-disk activation cache.

Layout of a cache folder::

    manifest.json             format version, model, hooks, widths, corpus, seed, shards + sha256
    tokens.npy                int32 [n_contexts, context]: every token, BOS included (for contexts)
    <hook>/shard_00000.acts   raw row-major [rows, d_in] in the cache dtype (memory-mappable)
    <hook>/shard_00000.grads  same layout: d(next-token CE)/d(activation), with --with-grads

A shard is a fixed number of contexts. Rows are the non-BOS positions of those contexts in
row-major order, so row r of the cache maps to the r-th non-BOS entry of ``tokens.npy``.
The manifest is rewritten atomically after every shard: a kill at any moment leaves complete
shards listed and at most a temp file, and the same command resumes after the last listed shard.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.corpus import corpus_fingerprint, iter_texts, load_corpus, pack_tokens
from activations.devices import DeviceError, check_device_spec, model_device, resolve_device
from activations.format import DTYPES, FORMAT_VERSION, MANIFEST, STORAGE_NUMPY, CacheError, sha256_file
from activations.hf_backend import BACKENDS
from activations.hooks import HookSpec, expand_hooks, is_pattern, resolve_hooks, stop_layer
from activations.models import load_model
from activations.storage import atomic_write_bytes, atomic_write_json

TARGET_SHARD_BYTES = 128 * 2**20
# Keys that decide a cache's bytes: a resume must match them all.
IDENTITY_KEYS = (
    "model",
    "hooks",
    "corpus",
    "corpus_fingerprint",
    "context",
    "seed",
    "n_contexts",
    "dtype",
    "with_grads",
    "batch_size",
    "shard_contexts",
    "skip_contexts",
    "backend",
    "model_dtype",
)


@dataclass
class CacheConfig:
    """What to cache. The string under each field is its ``saewb cache --help`` text."""

    model: str = "smollm2-135m"
    "Model: an offline name (smollm2-135m, gemma-3-270m), a local HF folder, or a transformer_lens name (online)."
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    ("Hook names (blocks.6.hook_resid_post, blocks.6.hook_mlp_out, blocks.6.attn.hook_z ...; with --backend hf "
     "module paths: model.layers.6, model.layers.6.mlp, model.layers.6.self_attn.o_proj:input); fnmatch patterns "
     "(blocks.*.hook_resid_post) expand to every match; one pass serves all.")
    backend: str = "transformer_lens"
    ("transformer_lens (a HookedTransformer: LayerNorm folded, writing weights centred) or hf (the Hugging Face "
     "model as it is, hooked by module name: any causal LM, less memory).")
    out: str = ""
    "Output folder (created; an existing cache of the same settings is resumed)."
    corpus: str = "default"
    ("'default' (KJV + stdlib prose, ~2.07M tokens, offline), 'default-large' (KJV + whole stdlib sources), 'kjv', "
     "'python-stdlib', 'python-stdlib-source', a .txt/.jsonl/.parquet file, or a HF dataset.")
    tokens: int = 100_000
    "Tokens to run through the model, rounded up to whole contexts (BOS rows are then dropped)."
    context: int = 128
    "Context length in tokens, BOS included."
    seed: int = 0
    "Seed for the document order."
    dtype: str = "float32"
    "Storage dtype: float32, float16 or bfloat16."
    with_grads: bool = False
    "Also store d(next-token CE)/d(activation) per row (needed by g-SAE; needs the full forward and a backward)."
    batch_size: int = 32
    "Contexts per forward pass."
    shard_contexts: int | None = None
    "Contexts per shard (default: about 128 MB of the widest hook)."
    skip_contexts: int = 0
    "Skip this many packed contexts first: a held-out cache that continues a training cache of the same corpus+seed."
    model_dtype: str = "float32"
    ("The model's dtype for the forward: float32, bfloat16 or float16 (part of the cache's identity: it changes the "
     "rows). float32 is the default on every device: on CPU bf16 matmuls are slower than fp32; on a GPU bfloat16 "
     "halves the model's memory and speeds the forward, at ~3 significant digits per activation.")
    device: str = "auto"
    ("Where the model runs: auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N; rows are stored from "
     "the CPU either way (not part of the cache's identity: a resume may use another device).")
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        try:
            check_device_spec(self.device)
        except DeviceError as exc:
            raise CacheError(f"--device: {exc}") from None
        if self.backend not in BACKENDS:
            raise CacheError(f"unknown --backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.model_dtype not in DTYPES:
            raise CacheError(f"unknown --model-dtype {self.model_dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.dtype not in DTYPES:
            raise CacheError(f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.context < 2:
            raise CacheError(f"--context must be at least 2 (BOS plus one token); got {self.context}")
        if self.tokens < self.context:
            raise CacheError(
                f"--tokens {self.tokens} is smaller than one context of {self.context} tokens; "
                f"ask for at least {self.context}"
            )
        if self.batch_size < 1:
            raise CacheError(f"--batch-size must be a positive number of contexts; got {self.batch_size}")
        if self.skip_contexts < 0:
            raise CacheError(f"--skip-contexts must be >= 0; got {self.skip_contexts}")
        if self.shard_contexts is not None and self.shard_contexts < 1:
            raise CacheError(f"shard size must be a positive number of contexts; got {self.shard_contexts}")


def _shard_name(index: int, kind: str) -> str:
    return f"shard_{index:05d}.{kind}"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".saewb-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc


class ShardWriter:
    """Writes finished shards on a background thread so disk I/O overlaps the next forward passes."""

    def __init__(self, out: Path, manifest: dict):
        self.out, self.manifest = out, manifest
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, index: int, start: int, end: int, arrays: dict[tuple[str, str], np.ndarray]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(index, start, end, arrays), daemon=True)
        self._thread.start()

    def join_quietly(self) -> None:
        """On an error elsewhere: let a running write finish (its shard stays valid) and drop its outcome."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, index: int, start: int, end: int, arrays: dict[tuple[str, str], np.ndarray]) -> None:
        files: dict[str, dict] = {}
        written: list[Path] = []
        try:
            rows = None
            for (hook, kind), array in arrays.items():
                rel = f"{hook}/{_shard_name(index, kind)}"
                data = np.ascontiguousarray(array).tobytes()
                atomic_write_bytes(self.out / rel, data)
                written.append(self.out / rel)
                files.setdefault(hook, {})[kind] = {"path": rel, "sha256": hashlib.sha256(data).hexdigest()}
                rows = array.shape[0]
            entry = {"index": index, "contexts": [start, end], "rows": int(rows), "files": files}
            shards = [s for s in self.manifest["shards"] if s["index"] != index] + [entry]
            shards = sorted(shards, key=lambda s: s["index"])
            # List the shard in memory only once the manifest on disk lists it too.
            atomic_write_json(self.out / MANIFEST, {**self.manifest, "shards": shards})
            self.manifest["shards"] = shards
        except OSError as exc:
            for path in written:  # a shard is all hooks or nothing
                path.unlink(missing_ok=True)
            done = len(self.manifest["shards"])
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            self._error = CacheError(
                f"could not write shard {index} to {self.out}: {reason}. The partial shard was removed; "
                f"{done} complete shard(s) are kept. Free space and rerun the same command to resume."
            )
        except BaseException as exc:  # surfaced on the main thread by wait()
            self._error = exc


def _identity(cfg: CacheConfig, n_contexts: int, shard_contexts: int) -> dict:
    return {
        "model": cfg.model,
        "hooks": list(cfg.hooks),
        "corpus": cfg.corpus,
        "corpus_fingerprint": corpus_fingerprint(cfg.corpus),
        "context": cfg.context,
        "seed": cfg.seed,
        "n_contexts": n_contexts,
        "dtype": cfg.dtype,
        "with_grads": cfg.with_grads,
        "batch_size": cfg.batch_size,
        "shard_contexts": shard_contexts,
        "skip_contexts": cfg.skip_contexts,
        "backend": cfg.backend,
        "model_dtype": cfg.model_dtype,
    }


def _refuse_mismatch(out: Path, old: dict, new: dict) -> None:
    old = {"backend": "transformer_lens", "model_dtype": "float32", **old}  # caches from before these keys
    diffs = [f"{k}: cache has {old.get(k)!r}, asked {new[k]!r}" for k in IDENTITY_KEYS if old.get(k) != new[k]]
    if diffs:
        raise CacheError(
            f"{out} already holds a different activation cache ({'; '.join(diffs)}). "
            "Use another --out folder, or delete this one to rebuild it."
        )


def _verify_listed_shards(out: Path, manifest: dict) -> list[int]:
    """Drop shards whose files are missing or fail their checksum, so a resume recomputes them."""
    bad = []
    for shard in manifest["shards"]:
        for kinds in shard["files"].values():
            for info in kinds.values():
                path = out / info["path"]
                if not path.exists() or sha256_file(path) != info["sha256"]:
                    bad.append(shard["index"])
    if bad:
        manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in bad]
        manifest["complete"] = False
    return sorted(set(bad))


def _remove_temp_files(out: Path) -> None:
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


class _Capture:
    """Forward hooks that keep each hooked activation, made differentiable when gradients are wanted."""

    def __init__(self, names: list[str], with_grads: bool):
        self.names, self.with_grads = names, with_grads
        self.acts: dict[str, torch.Tensor] = {}

    def hooks(self):
        return [(name, self._hook) for name in self.names]

    def _hook(self, act: torch.Tensor, hook):
        if self.with_grads and not act.requires_grad:
            # The first hooked tensor on the path becomes a leaf; later ones stay in its graph.
            act = act.detach().requires_grad_(True)
            self.acts[hook.name] = act
            return act
        self.acts[hook.name] = act
        return None


def next_token_ce_sum(logits: torch.Tensor, tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Sum of next-token CE over positions whose target is not BOS (a document boundary is no prediction).

    A sum, not a mean, so each row's gradient does not depend on the batch size.
    """
    logprobs = logits[:, :-1].float().log_softmax(-1)
    targets = tokens[:, 1:]
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll * (targets != bos_id)).sum()


def _run_batch(model, tokens: torch.Tensor, specs: list[HookSpec], with_grads: bool, bos_id: int):
    names = [s.name for s in specs]
    capture = _Capture(names, with_grads)
    if not with_grads:
        with torch.no_grad():
            model.run_with_hooks(
                tokens,
                fwd_hooks=capture.hooks(),
                stop_at_layer=stop_layer(specs, model.cfg.n_layers),
                return_type=None,
            )
        return {n: capture.acts[n] for n in names}, None
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=capture.hooks(), return_type="logits")
        loss = next_token_ce_sum(logits, tokens, bos_id)
        grads = torch.autograd.grad(loss, [capture.acts[n] for n in names], allow_unused=True)
    acts = {n: capture.acts[n].detach() for n in names}
    return acts, {n: (torch.zeros_like(acts[n]) if g is None else g) for n, g in zip(names, grads, strict=True)}


def _to_storage(rows: torch.Tensor, dtype: str) -> np.ndarray:
    rows = rows.to(DTYPES[dtype]).cpu().contiguous()
    if dtype == "bfloat16":
        return rows.view(torch.int16).numpy().view(np.uint16)
    return rows.numpy()


def make_tokens(cfg: CacheConfig, tokenizer, bos_id: int, n_contexts: int) -> np.ndarray:
    corpus = load_corpus(cfg.corpus)
    packed = pack_tokens(iter_texts(corpus, cfg.seed), tokenizer, cfg.skip_contexts + n_contexts, cfg.context, bos_id)
    return packed[cfg.skip_contexts :]


def build_cache(cfg: CacheConfig, model=None, progress: bool = True) -> dict:
    """Create or resume the cache described by ``cfg``; returns the final manifest."""
    cfg.validate()
    _device(cfg)  # before any folder is made
    if any(is_pattern(h) for h in cfg.hooks):  # the manifest lists the hooks a pattern stood for
        model = model or _load(cfg)
        cfg = dataclasses.replace(cfg, hooks=expand_hooks(model, cfg.hooks))
    out = Path(cfg.out).expanduser()
    n_contexts = -(-cfg.tokens // cfg.context)
    existing = None
    if (out / MANIFEST).exists():
        try:
            existing = json.loads((out / MANIFEST).read_text())
        except ValueError as exc:
            raise CacheError(f"{out / MANIFEST} is not valid JSON ({exc}); delete {out} to rebuild") from exc
    elif out.is_dir() and any(p.name != "tokens.npy" and not p.name.endswith(".tmp") for p in out.iterdir()):
        # (a folder holding only tokens.npy was killed before its first manifest: start it afresh)
        raise CacheError(f"{out} exists and is not empty, but holds no {MANIFEST}: choose an empty or new folder")
    _check_writable(out)
    if existing is not None:
        if existing.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{out} holds cache format {existing.get('format_version')}, this is {FORMAT_VERSION}")
        # Without an explicit shard size, a resume adopts the cache's own; all else must match.
        shard_contexts = cfg.shard_contexts or existing.get("shard_contexts")
        _refuse_mismatch(out, existing, _identity(cfg, n_contexts, shard_contexts))
    _remove_temp_files(out)  # leftovers of a killed run (only after any refusal: a refused run changes nothing)
    if existing is not None:
        bad = _verify_listed_shards(out, existing)
        if bad and progress:
            print(f"[saewb] shards {bad} were damaged or missing: recomputing them", file=sys.stderr)
        if existing.get("complete"):
            if progress:
                print(
                    f"[saewb] {out} is already complete ({existing['n_tokens']:,} rows); nothing to do", file=sys.stderr
                )
            return existing

    if model is None:
        model = _load(cfg)
    if getattr(model, "backend", "transformer_lens") != cfg.backend:
        raise CacheError(f"the model given is a {getattr(model, 'backend', 'transformer_lens')} model but the cache "
                         f"asks for backend {cfg.backend!r}")
    specs = resolve_hooks(model, cfg.hooks)
    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.bos_token_id is None:
        raise CacheError(f"model {cfg.model!r} has no tokenizer with a BOS token; one is needed to pack contexts")
    bos_id = int(tokenizer.bos_token_id)
    if existing is None:
        widest = max(s.d_in for s in specs) * np.dtype(STORAGE_NUMPY[cfg.dtype]).itemsize * cfg.context
        shard_contexts = cfg.shard_contexts or max(
            cfg.batch_size, (TARGET_SHARD_BYTES // widest) // cfg.batch_size * cfg.batch_size
        )
    identity = _identity(cfg, n_contexts, shard_contexts)

    if existing is not None:
        manifest = existing
        tokens = np.load(out / "tokens.npy")
        if sha256_file(out / "tokens.npy") != manifest["tokens_sha256"]:
            raise CacheError(f"{out / 'tokens.npy'} fails its checksum; delete {out} to rebuild the cache")
    else:
        t0 = time.perf_counter()
        tokens = make_tokens(cfg, tokenizer, bos_id, n_contexts)
        atomic_write_bytes(out / "tokens.npy", _npy_bytes(tokens))
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "saewb-activation-cache",
            **identity,
            "tokens_requested": cfg.tokens,
            "model_class": type(model).__name__,
            "model_config_name": model.cfg.model_name,
            "n_layers": model.cfg.n_layers,
            "d_in": {s.name: s.d_in for s in specs},
            "bos_token_id": bos_id,
            "tokenizer": type(tokenizer).__name__,
            "tokens_sha256": sha256_file(out / "tokens.npy"),
            "n_shards": -(-n_contexts // shard_contexts),
            "shards": [],
            "complete": False,
            "extra": cfg.extra,
        }
        atomic_write_json(out / MANIFEST, manifest)
        if progress:
            print(
                f"[saewb] tokenised {n_contexts} contexts of {cfg.context} in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
            )

    return _fill_shards(model, cfg, specs, tokens, manifest, out, bos_id, progress)


def _device(cfg: CacheConfig) -> torch.device:
    """The cache's device, checked against the hardware (one clear error for a CUDA device this machine lacks)."""
    try:
        return resolve_device(cfg.device)
    except DeviceError as exc:
        raise CacheError(f"--device: {exc}") from None


def _load(cfg: CacheConfig):
    """The cache's model on its device."""
    return load_model(cfg.model, device=str(_device(cfg)), dtype=DTYPES[cfg.model_dtype], backend=cfg.backend)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _fill_shards(model, cfg, specs, tokens, manifest, out: Path, bos_id: int, progress: bool) -> dict:
    shard_contexts = manifest["shard_contexts"]
    n_contexts = manifest["n_contexts"]
    done = {s["index"] for s in manifest["shards"]}
    todo = [i for i in range(manifest["n_shards"]) if i not in done]
    keep = tokens != bos_id
    device = model_device(model)
    writer = ShardWriter(out, manifest)
    total_rows_todo = int(sum(keep[i * shard_contexts : (i + 1) * shard_contexts].sum() for i in todo))
    bar = tqdm(
        total=total_rows_todo, unit="tok", unit_scale=True, desc="caching", disable=not progress, dynamic_ncols=True
    )
    started, rows_done = time.perf_counter(), 0
    try:
        for index in todo:
            start, end = index * shard_contexts, min((index + 1) * shard_contexts, n_contexts)
            parts: dict[tuple[str, str], list[np.ndarray]] = {}
            for b0 in range(start, end, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, end)
                batch = torch.from_numpy(tokens[b0:b1].astype(np.int64)).to(device)
                mask = torch.from_numpy(keep[b0:b1]).to(device)
                acts, grads = _run_batch(model, batch, specs, cfg.with_grads, bos_id)
                for spec in specs:
                    flat = acts[spec.name].reshape(b1 - b0, cfg.context, spec.d_in)[mask]
                    _check_finite(flat.to(DTYPES[cfg.dtype]), spec.name, b0)  # float16 overflows past 65504
                    parts.setdefault((spec.name, "acts"), []).append(_to_storage(flat, cfg.dtype))
                    if grads is not None:
                        gflat = grads[spec.name].reshape(b1 - b0, cfg.context, spec.d_in)[mask]
                        _check_finite(gflat.to(DTYPES[cfg.dtype]), spec.name, b0, "gradient")
                        parts.setdefault((spec.name, "grads"), []).append(_to_storage(gflat, cfg.dtype))
                n_rows = int(mask.sum())
                rows_done += n_rows
                bar.update(n_rows)
                bar.set_postfix(tok_s=f"{rows_done / (time.perf_counter() - started):,.0f}", refresh=False)
            writer.submit(index, start, end, {key: np.concatenate(v) for key, v in parts.items()})
        writer.wait()
    except BaseException:
        writer.join_quietly()
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    manifest["n_tokens"] = int(sum(s["rows"] for s in manifest["shards"]))
    manifest["complete"] = len(manifest["shards"]) == manifest["n_shards"]
    manifest["last_run"] = {
        "rows": rows_done,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(rows_done / max(elapsed, 1e-9), 1),
    }
    atomic_write_json(out / MANIFEST, manifest)
    if progress:
        gb = _folder_bytes(out) / 1e9
        print(
            f"[saewb] cached {manifest['n_tokens']:,} tokens x {len(specs)} hook(s) "
            f"({gb:.3f} GB) in {out} at {rows_done / max(elapsed, 1e-9):,.0f} tokens/s",
            file=sys.stderr,
        )
    return manifest


def _check_finite(rows: torch.Tensor, hook: str, first_context: int, what: str = "activation") -> None:
    if not torch.isfinite(rows).all():
        raise CacheError(
            f"the model produced a NaN/inf {what} at hook {hook} in contexts starting at {first_context}; "
            "try --dtype float32 or a float32 model"
        )


def _folder_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
