"""Reading an activation cache: memory-mapped shards, checksums, shuffled batches and token contexts."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from activations.format import FORMAT_VERSION, MANIFEST, STORAGE_NUMPY, CacheError, sha256_file
from activations.shuffle import mixing_buffer

CHUNK_ROWS = 8192


MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "model": str, "hooks": list, "d_in": dict, "dtype": str, "context": int,
    "n_tokens": int, "with_grads": bool, "complete": bool, "n_shards": int, "shards": list,
}
"""What the reader needs from manifest.json, and the JSON type of each."""
INCOMPLETE_KEYS = ("format_version", "complete", "n_shards", "shards")


def read_manifest(folder: Path) -> dict:
    """manifest.json of a cache folder, checked for what the reader needs; one CacheError naming the fix."""
    path = folder / MANIFEST
    rebuild = f"delete {folder} and rerun the `saewb cache` command that made it"
    if not path.exists():
        if folder.is_dir() and any(folder.iterdir()):  # `saewb cache` refuses a non-empty folder without manifest
            raise CacheError(
                f"{folder} holds files but no {MANIFEST}: it is not an activation cache, or one whose manifest was "
                f"lost; {rebuild}, or cache into a new folder with `saewb cache --out NEW_FOLDER`"
            )
        raise CacheError(f"{folder} is not an activation cache (no {MANIFEST}); create one with "
                         f"`saewb cache --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is damaged (not valid JSON: {exc}); {rebuild}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} is damaged (a JSON {type(manifest).__name__}, not an object); {rebuild}")
    # an unfinished cache's manifest has no totals yet: the reader only needs to say how far it got
    required = MANIFEST_KEYS if manifest.get("complete") else {k: MANIFEST_KEYS[k] for k in INCOMPLETE_KEYS}
    missing = [key for key in required if key not in manifest]
    wrong = [f"{key} ({type(manifest[key]).__name__})" for key, kind in required.items()
             if key in manifest and (not isinstance(manifest[key], kind) or (kind is int and manifest[key] is True))]
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    if any(not isinstance(sh, dict) or not isinstance(sh.get("rows"), int) or not isinstance(sh.get("files"), dict)
           for sh in shards):
        wrong.append("shards (each needs rows and files)")
    hooks = manifest.get("hooks") if isinstance(manifest.get("hooks"), list) else []
    if isinstance(manifest.get("d_in"), dict) and any(not isinstance(manifest["d_in"].get(h), int) for h in hooks):
        wrong.append("d_in (a width for every hook)")
    if missing or wrong:
        problems = "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"bad {', '.join(wrong)}"] if wrong else [])
        )
        raise CacheError(f"{path} is damaged or hand-edited ({problems}); {rebuild}")
    return manifest


class ActivationCache:
    """A complete cache folder; see :mod:`activations.cache` for its layout."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.path} has cache format {self.manifest.get('format_version')}; "
                f"this version reads format {FORMAT_VERSION}"
            )
        if not self.manifest.get("complete"):
            done, total = len(self.manifest["shards"]), self.manifest["n_shards"]
            raise CacheError(
                f"{self.path} is incomplete ({done}/{total} shards): rerun the same `saewb cache` command to finish it"
            )
        self.verify = verify
        self._verified: set[str] = set()
        self._tokens: np.ndarray | None = None
        self._row_index: np.ndarray | None = None

    # -- what the cache holds ---------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def d_in(self) -> int:
        """Width of the first hook (the one used when ``hook`` is not given)."""
        return int(self.manifest["d_in"][self.hooks[0]])

    @property
    def n_tokens(self) -> int:
        """Training rows: every non-BOS position of every context."""
        return int(self.manifest["n_tokens"])

    @property
    def has_grads(self) -> bool:
        return bool(self.manifest["with_grads"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    def only(self, hook: str) -> ActivationCache:
        """This cache seen through one of its hooks: the same files, with `hook` as its first and only hook (what a
        reader that takes a cache's first hook, such as sae.train, then reads)."""
        view = copy.copy(self)
        view.manifest = {**self.manifest, "hooks": [self._hook(hook)]}
        return view

    def _hook(self, hook: str | None) -> str:
        if hook is None:
            return self.hooks[0]
        if hook not in self.manifest["d_in"]:
            raise CacheError(f"hook {hook!r} is not in this cache; it holds {self.hooks}")
        return hook

    # -- shard access -------------------------------------------------------------------------
    def _open(self, info: dict, rows: int, width: int) -> np.ndarray:
        path = self.path / info["path"]
        if not path.exists():
            raise CacheError(f"shard file {path} is missing; rerun the same `saewb cache` command to recompute it")
        if self.verify and info["path"] not in self._verified:
            if sha256_file(path) != info["sha256"]:
                raise CacheError(
                    f"shard {path} is corrupted (sha256 mismatch); rerun the same `saewb cache` command to recompute it"
                )
            self._verified.add(info["path"])
        storage = STORAGE_NUMPY[self.dtype]
        expected = rows * width * np.dtype(storage).itemsize
        if path.stat().st_size != expected:
            raise CacheError(f"shard {path} has {path.stat().st_size} bytes, expected {expected}: it is corrupted")
        # copy-on-write: writable for torch.from_numpy without a copy, and the file is never changed
        return np.memmap(path, dtype=storage, mode="c", shape=(rows, width))

    def _as_float(self, array: np.ndarray) -> torch.Tensor:
        """float32 rows of a shard slice: float32 shards without a copy (the pages are read where the rows go next,
        the shuffle buffer or a concatenation), float16/bfloat16 converted in one pass."""
        tensor = torch.from_numpy(array)
        if self.dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def shard_arrays(self, index: int, hook: str | None = None, kind: str = "acts") -> np.ndarray:
        hook = self._hook(hook)
        shard = self.manifest["shards"][index]
        if kind not in shard["files"][hook]:
            raise CacheError(f"{self.path} has no {kind}: cache with `saewb cache --with-grads` to store gradients")
        return self._open(shard["files"][hook][kind], shard["rows"], self.manifest["d_in"][hook])

    def rows(self, start: int, stop: int, hook: str | None = None, kind: str = "acts") -> torch.Tensor:
        """Rows ``[start, stop)`` in cache order, as float32."""
        out, offset = [], 0
        for i, shard in enumerate(self.manifest["shards"]):
            lo, hi = max(start, offset), min(stop, offset + shard["rows"])
            if lo < hi:
                out.append(self._as_float(self.shard_arrays(i, hook, kind)[lo - offset : hi - offset]))
            offset += shard["rows"]
        if not out:
            return torch.empty(0, self.manifest["d_in"][self._hook(hook)])
        return torch.cat(out)

    def spread_rows(self, n_rows: int, skip_rows: int = 0, hook: str | None = None) -> tuple[torch.Tensor, int]:
        """About ``n_rows`` rows as whole contexts evenly spaced over the cache (those starting at or after row
        ``skip_rows``), and how many contexts they come from (blocks of the context length in a cache
        written without tokens).

        A cache holds its documents in order, so ``rows(start, stop)`` covers only the few documents that happen
        to lie there; statistics that must hold on other documents (inference thresholds) need this sample.
        All the rows from ``skip_rows`` on when there are no more than ``n_rows`` of them.
        """
        if n_rows < 1 or skip_rows < 0:
            raise ValueError(f"n_rows must be >= 1 and skip_rows >= 0, got {n_rows} and {skip_rows}")
        if (self.path / "tokens.npy").exists():
            ctx = self.row_index[:, 0]
            starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])  # first row of every context
        else:  # rows written without their tokens: blocks of a context's length stand in for contexts
            starts = np.arange(0, self.n_tokens, max(1, int(self.manifest["context"])))
        stops = np.r_[starts[1:], self.n_tokens]
        keep = starts >= skip_rows
        starts, stops = starts[keep], stops[keep]
        if stops.size == 0 or int((stops - starts).sum()) <= n_rows:
            return self.rows(int(starts[0]) if starts.size else skip_rows, self.n_tokens, hook=hook), len(starts)
        per_context = float((stops - starts).mean())
        want = min(len(starts), int(np.ceil(n_rows / per_context)))
        picked = np.unique(np.linspace(0, len(starts) - 1, want).round().astype(np.int64))
        parts, held = [], 0
        for i in picked:
            if held >= n_rows:
                break
            part = self.rows(int(starts[i]), int(stops[i]), hook=hook)[: n_rows - held]
            parts.append(part)
            held += part.shape[0]
        return torch.cat(parts), len(parts)

    def _chunks(
        self, hook: str, order: list[int], with_grads: bool, rank: int = 0, world_size: int = 1
    ) -> Iterator[torch.Tensor]:
        """Row chunks of the shards in `order`; with world_size W, rank r reads the r-th W-th of each chunk."""
        for index in order:
            acts = self.shard_arrays(index, hook, "acts")
            grads = self.shard_arrays(index, hook, "grads") if with_grads else None
            for start in range(0, acts.shape[0], CHUNK_ROWS):
                n = min(CHUNK_ROWS, acts.shape[0] - start)
                lo, hi = start + n * rank // world_size, start + n * (rank + 1) // world_size
                if lo == hi:
                    continue
                chunk = self._as_float(acts[lo:hi])
                if grads is not None:
                    chunk = torch.cat([chunk, self._as_float(grads[lo:hi])], dim=1)
                yield chunk

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        hook: str | None = None,
        buffer_rows: int = 262_144,
        with_grads: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """One pass over every row: float32 ``[B, d]`` batches, or ``(acts, grads)`` when the cache has grads.

        Shuffling permutes the shard order and mixes rows through a ``buffer_rows`` buffer, so memory
        stays bounded whatever the cache size; the same seed gives the same batches. With
        ``world_size`` W > 1 the pass covers only rank ``rank``'s 1/W of every ``CHUNK_ROWS``-row chunk
        (data-parallel training: each rank reads its own disjoint, equal share).
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, "
                             f"world_size={world_size}")
        hook = self._hook(hook)
        want_grads = self.has_grads if with_grads is None else with_grads
        if want_grads and not self.has_grads:
            raise CacheError(f"{self.path} has no gradients: cache with `saewb cache --with-grads`")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        order = list(range(len(self.manifest["shards"])))
        if generator is not None:
            order = torch.randperm(len(order), generator=generator).tolist()
        width = self.manifest["d_in"][hook]
        chunks = self._chunks(hook, order, want_grads, rank, world_size)
        for batch in mixing_buffer(chunks, batch_size, buffer_rows, generator):
            yield (batch[:, :width], batch[:, width:]) if want_grads else batch

    # -- tokens and contexts -------------------------------------------------------------------
    @property
    def tokens(self) -> np.ndarray:
        """``int32 [n_contexts, context]``, BOS included."""
        if self._tokens is None:
            self._tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        return self._tokens

    @property
    def row_index(self) -> np.ndarray:
        """``[n_tokens, 2]``: (context, position) of every row, in cache order."""
        if self._row_index is None:
            ctx, pos = np.nonzero(np.asarray(self.tokens) != self.manifest["bos_token_id"])
            self._row_index = np.stack([ctx, pos], axis=1).astype(np.int64)
        return self._row_index

    def context_of(self, row: int) -> tuple[np.ndarray, int]:
        """The token ids of the context holding ``row`` and the row's position in it."""
        if not 0 <= row < self.n_tokens:
            raise IndexError(f"row {row} is out of range for a cache of {self.n_tokens} rows")
        ctx, pos = self.row_index[row]
        return np.asarray(self.tokens[ctx]), int(pos)

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, model={self.model!r}, hooks={self.hooks}, "
            f"n_tokens={self.n_tokens}, d_in={self.d_in}, dtype={self.dtype}, grads={self.has_grads})"
        )


def load_cache(path: str | Path, verify: bool = True) -> ActivationCache:
    """Open a complete cache folder written by ``saewb cache``."""
    return ActivationCache(path, verify=verify)
