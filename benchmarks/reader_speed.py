"""How fast the activation cache reads, against this machine's memcpy rate measured in the same run (issue 11).

    .venv/bin/python benchmarks/reader_speed.py --cache runs/long/cache [--passes 2] [--out runs/bench-reader]

For a cache already on disk: the memcpy rate of a 256 MB buffer (numpy copy into a preallocated target, the ceiling
of any reader), then `iter_batches(4096)` sequential (shuffle=False) and shuffled (shuffle=True, the default
262,144-row buffer), each for `--passes` whole passes after one warm-up pass that also fills the page cache and
verifies every shard's sha256 once (the first pass of a fresh `load_cache` pays that; later passes do not). GB/s
counts the float32 bytes delivered. Peak RSS of the process is reported to show the memory stays bounded (the
shuffle buffer, not the cache). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np

import activations


def memcpy_gb_s(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page of both before timing
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - began)
    return n_bytes / statistics.median(times) / 1e9


def one_pass(cache, shuffle: bool, batch_size: int, seed: int) -> float:
    """GB/s of float32 rows delivered by one pass of iter_batches."""
    began, n_bytes = time.perf_counter(), 0
    for batch in cache.iter_batches(batch_size, shuffle=shuffle, seed=seed, with_grads=False):
        n_bytes += batch.numel() * 4
    return n_bytes / (time.perf_counter() - began) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="an activation cache folder")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per mode (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", default="runs/bench-reader")
    args = parser.parse_args()
    cache = activations.load_cache(args.cache)
    gigabytes = cache.n_tokens * cache.d_in * 4 / 1e9
    began = time.perf_counter()
    one_pass(cache, False, args.batch_size, 0)  # warm the page cache; verifies every shard once
    first = time.perf_counter() - began
    ceiling = memcpy_gb_s()
    result = {"cache": str(args.cache), "rows": cache.n_tokens, "d_in": cache.d_in, "gigabytes": gigabytes,
              "dtype": cache.dtype, "memcpy_gb_s": ceiling, "first_pass_with_checksums_gb_s": gigabytes / first}
    for mode, shuffle in (("sequential", False), ("shuffled", True)):
        rates = [one_pass(cache, shuffle, args.batch_size, seed) for seed in range(args.passes)]
        result[f"{mode}_gb_s"] = statistics.median(rates)
        result[f"{mode}_runs_gb_s"] = rates
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reader_speed.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
