"""The hf activations backend against the transformer_lens one on the default model (issue 14).

    .venv/bin/python benchmarks/hf_backend.py [--tokens 16384] [--repeats 2] [--out runs/bench-hf]

1. The relation of the activations: on the same contexts, ``model.layers.L`` (hf) against
   ``blocks.L.hook_resid_post`` (transformer_lens), ``model.layers.L.mlp`` against ``hook_mlp_out`` and
   ``self_attn.o_proj:input`` against ``attn.hook_z``: max absolute and relative difference.
2. Caching speed and memory: ``saewb cache`` in a fresh process per run, the backends alternating, reporting
   tokens/s (the manifest's last_run) and the process's peak RSS (/usr/bin/time's %M).

Run it on a quiet machine (nothing else heavy): the timings share the two cores with nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import activations
from activations.cache import make_tokens

LAYER = 6
PAIRS = (
    (f"model.layers.{LAYER}", f"blocks.{LAYER}.hook_resid_post"),
    (f"model.layers.{LAYER}.mlp", f"blocks.{LAYER}.hook_mlp_out"),
    (f"model.layers.{LAYER}.self_attn.o_proj:input", f"blocks.{LAYER}.attn.hook_z"),
)


def relation(n_contexts: int) -> list[dict]:
    hf = activations.load_model("smollm2-135m", backend="hf")
    tl = activations.load_model("smollm2-135m")
    cfg = activations.CacheConfig(tokens=n_contexts * 128)
    tokens = torch.from_numpy(make_tokens(cfg, tl.tokenizer, int(tl.tokenizer.bos_token_id),
                                                            n_contexts).astype(np.int64))
    out = []
    with torch.no_grad():
        _, ours = hf.run_with_cache(tokens, names_filter=[m for m, _ in PAIRS])
        _, theirs = tl.run_with_cache(tokens, names_filter=[h for _, h in PAIRS])
        logprob_gap = float((hf(tokens).log_softmax(-1) - tl(tokens).log_softmax(-1)).abs().max())
    keep = tokens != int(tl.tokenizer.bos_token_id)
    for module, hook in PAIRS:
        a, b = ours[module][keep], theirs[hook].reshape(*tokens.shape, -1)[keep]
        diff = (a - b).abs()
        out.append({"hf": module, "transformer_lens": hook, "rows": int(a.shape[0]), "width": int(a.shape[1]),
                    "max_abs_diff": float(diff.max()), "max_abs_value": float(b.abs().max()),
                    "max_rel_diff_of_row_norm": float((diff.norm(dim=1) / b.norm(dim=1)).max())})
    out.append({"max_abs_logprob_diff": logprob_gap, "contexts": n_contexts})
    return out


def cache_run(backend: str, tokens: int, out: Path) -> dict:
    hook = f"model.layers.{LAYER}" if backend == "hf" else f"blocks.{LAYER}.hook_resid_post"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "saewb"), "cache", "--backend", backend, "--hooks", hook, "--tokens",
           str(tokens), "--out", str(out), "--quiet"]
    started = time.perf_counter()
    # /usr/bin/time reports the command's own peak RSS: a child forked from this process (which holds both models
    # after the relation step) would report this process's peak instead
    done = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kb=%M", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {done.returncode}: {done.stderr[-500:]}")
    peak_kb = int(done.stderr.rsplit("peak_rss_kb=", 1)[1].split()[0])
    manifest = json.loads((out / "manifest.json").read_text())
    return {"backend": backend, "tokens_per_s": manifest["last_run"]["tokens_per_s"],
            "wall_s_incl_load": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_kb / 1024), "rows": manifest["n_tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens cached per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per backend, alternating")
    parser.add_argument("--relation-contexts", type=int, default=16)
    parser.add_argument("--skip-timing", action="store_true", help="only the activation relation")
    parser.add_argument("--out", default="runs/bench-hf")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"relation": relation(args.relation_contexts), "torch_threads": torch.get_num_threads()}
    print(json.dumps(result["relation"], indent=1))
    if not args.skip_timing:
        runs = []
        for i in range(args.repeats):
            for backend in ("transformer_lens", "hf"):
                runs.append({**cache_run(backend, args.tokens, out / f"cache-{backend}"), "repeat": i})
                print(json.dumps(runs[-1]))
        result["caching"] = runs
        for backend in ("transformer_lens", "hf"):
            mine = [r for r in runs if r["backend"] == backend]
            result[f"{backend}_median_tokens_per_s"] = float(np.median([r["tokens_per_s"] for r in mine]))
            result[f"{backend}_max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in mine)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
