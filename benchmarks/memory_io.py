"""Memory bounds and cache-read speed, measured in child processes (peak RSS per process from wait4).

    .venv/bin/python benchmarks/memory_io.py [--small-tokens 140544] [--large-tokens 562176] [--steps 12]

1. Caching memory is bounded by the model, `--shard-contexts` and --batch-size, not by --tokens: `saewb
   cache` with a small and the default shard size, and at two corpus sizes (a cache is built once; the
   peak RSS of the run that built it is kept beside it in <out>/<name>.caching.json).
2. Training memory is bounded by batch x F, the SAE and the shuffle buffer (`shuffle_buffer_rows`), not by
   the cache size: the same TopK run (F=9216, k=32, batch 4096, a 65,536-row buffer) on caches of 140k and
   562k real rows and on 4x and 16x replicas of the larger one (its shards listed again, see `replicate`).
3. Reading: GB/s of `iter_batches(4096, shuffle=True)` alone, and training tokens/s from the cache with
   the background prefetch thread on (2 batches) and off, alternating runs.

Writes <out>/memory_io.json and prints a Markdown table; caches are built once under <out> and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.6.hook_resid_post"


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS MB, seconds, stdout) of one child process."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, seconds, out


def saewb() -> str:
    return str(Path(sys.executable).with_name("saewb"))


def cache(out: Path, tokens: int, shard_contexts: int | None) -> dict[str, Any]:
    """Build (or reuse) one cache; report the caching process's peak RSS when it was built now."""
    folder = out / (f"mem-cache-{tokens}" + (f"-shard{shard_contexts}" if shard_contexts else ""))
    built = not (folder / "manifest.json").exists()
    cmd = [saewb(), "cache", "--model", "smollm2-135m", "--hook", HOOK, "--tokens", str(tokens),
           "--out", str(folder), "--quiet"]
    if shard_contexts:
        cmd += ["--shard-contexts", str(shard_contexts)]
    record = out / f"{folder.name}.caching.json"  # what the run that built the cache measured
    rss, seconds, _ = run_child(cmd)
    if built:
        record.write_text(json.dumps({"peak_rss_mb": rss, "seconds": seconds}))
    measured = json.loads(record.read_text()) if record.exists() else {"peak_rss_mb": None, "seconds": None}
    manifest = json.loads((folder / "manifest.json").read_text())
    return {"folder": str(folder), "tokens": tokens, "shard_contexts": shard_contexts or "default",
            "shard_rows": max(s["rows"] for s in manifest["shards"]), "rows": manifest["n_tokens"], **measured}


TRAIN_CHILD = """
import json, sys, time, resource, torch
import activations, sae
path, steps, prefetch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = activations.load_cache(path)
t = sae.build_trainer(c, arch="topk", n_features=9216, k=32, batch_size=4096, total_tokens=steps * 4096,
                      progress=False, prefetch_batches=prefetch, norm_estimation_batches=1,
                      geometric_median_rows=4096, shuffle_buffer_rows=65536)
t.initialize(); t.resume = lambda: True  # measure the loop only
began = time.perf_counter(); t.run(); seconds = time.perf_counter() - began
print(json.dumps({"tokens_per_s": steps * 4096 / seconds}))
"""

READ_CHILD = """
import json, sys, time, activations
c = activations.load_cache(sys.argv[1]); rows = 0
began = time.perf_counter()
for x in c.iter_batches(4096, shuffle=True, seed=0):
    rows += x.shape[0]
seconds = time.perf_counter() - began
print(json.dumps({"rows": rows, "gb_per_s": rows * x.shape[1] * 4 / seconds / 1e9, "seconds": seconds}))
"""


def replicate(src: str, times: int) -> str:
    """A cache `times` as large without new data: its manifest lists src's shards `times` over (symlinks).

    Training memory cannot tell repeated rows from new ones, so this measures a large corpus's footprint
    without hours of caching; the shard files themselves are src's.
    """
    src_path = Path(src)
    dst = src_path.with_name(f"{src_path.name}-x{times}")
    if (dst / "manifest.json").exists():
        return str(dst)
    manifest = json.loads((src_path / "manifest.json").read_text())
    shards = []
    for rep in range(times):
        for shard in manifest["shards"]:
            files = {}
            for hook, kinds in shard["files"].items():
                files[hook] = {}
                for kind, info in kinds.items():
                    rel = Path(info["path"])
                    link = dst / rel.parent / f"{rel.stem}_rep{rep}{rel.suffix}"
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.exists():
                        link.symlink_to((src_path / rel).resolve())
                    files[hook][kind] = {**info, "path": str(link.relative_to(dst))}
            shards.append({**shard, "index": len(shards), "files": files})
    manifest.update(shards=shards, n_shards=len(shards), n_tokens=manifest["n_tokens"] * times,
                    n_contexts=manifest["n_contexts"] * times)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return str(dst)


def train(folder: str, steps: int, prefetch: int) -> dict[str, Any]:
    rss, _, out = run_child([sys.executable, "-c", TRAIN_CHILD, folder, str(steps), str(prefetch)])
    return {"peak_rss_mb": rss, **json.loads(out.strip().splitlines()[-1])}


def read(folder: str) -> dict[str, Any]:
    rss, _, out = run_child([sys.executable, "-c", READ_CHILD, folder])
    return {"peak_rss_mb": rss, **json.loads(out.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-tokens", type=int, default=140_544, help="tokens of the small cache")
    parser.add_argument("--large-tokens", type=int, default=562_176, help="tokens of the large cache (4x)")
    parser.add_argument("--small-shard-contexts", type=int, default=64,
                        help="--shard-contexts of the small-shard caching runs (default 64 contexts)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per training run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per prefetch setting")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="work folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    caching = [cache(args.out, args.small_tokens, args.small_shard_contexts), cache(args.out, args.small_tokens, None),
               cache(args.out, args.large_tokens, None)]
    small, large = (c["folder"] for c in caching if c["shard_contexts"] == "default")
    folders = [small, large, replicate(large, 4), replicate(large, 16)]
    training = []
    for folder in folders:
        rows = json.loads((Path(folder) / "manifest.json").read_text())["n_tokens"]
        training.append({"cache_rows": rows, "folder": folder, **train(folder, args.steps, 2)})
    prefetch: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(args.repeats):  # alternating, so drift hits both settings alike
        for depth in prefetch:
            prefetch[depth].append(train(large, args.steps, depth)["tokens_per_s"])
    reading = read(large)
    result = {"caching": caching, "training": training, "prefetch": prefetch, "reading": reading,
              "steps": args.steps, "argv": sys.argv[1:]}
    (args.out / "memory_io.json").write_text(json.dumps(result, indent=2))
    print("| caching: tokens | shard contexts (rows) | peak RSS MB |\n|---:|---:|---:|")
    for c in caching:
        rss = "not recorded" if c["peak_rss_mb"] is None else f"{c['peak_rss_mb']:,.0f}"
        print(f"| {c['tokens']:,} | {c['shard_contexts']} ({c['shard_rows']:,}) | {rss} |")
    print("\n| training TopK F=9216 B=4096: cache rows | peak RSS MB | tokens/s |\n|---:|---:|---:|")
    for t in training:
        print(f"| {t['cache_rows']:,} | {t['peak_rss_mb']:,.0f} | {t['tokens_per_s']:,.0f} |")
    median = {depth: statistics.median(rates) for depth, rates in prefetch.items()}
    print(f"\nreading {reading['rows']:,} rows shuffled: {reading['gb_per_s']:.2f} GB/s; training from the cache "
          f"(median of {args.repeats}): {median[0]:,.0f} tokens/s without prefetch, {median[2]:,.0f} with 2 batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
