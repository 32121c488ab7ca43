"""Caching throughput against the bare model forward pass (same hooks, same stop layer, same batches).

    .venv/bin/python benchmarks/cache_throughput.py --tokens 65536 --repeats 3

Runs alternate (forward, cache, forward, cache, ...) so drift in machine load hits both; reports
the median tokens/s of each (BOS positions counted, as the model processes them) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from activations import CacheConfig, build_cache, load_model
from activations.cache import make_tokens
from activations.hooks import resolve_hooks, stop_layer


def bare_forward(model, tokens: np.ndarray, hooks: list[str], batch: int, stop: int | None) -> float:
    """Forward passes that keep the hooked activations and nothing else: the floor caching must approach."""
    kept: list[torch.Tensor] = []

    def keep(act, hook):
        kept.append(act)

    started = time.perf_counter()
    with torch.no_grad():
        for b0 in range(0, tokens.shape[0], batch):
            x = torch.from_numpy(tokens[b0 : b0 + batch].astype(np.int64))
            model.run_with_hooks(x, fwd_hooks=[(h, keep) for h in hooks], stop_at_layer=stop, return_type=None)
            kept.clear()
    return tokens.size / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", action="append", default=None, help="default: blocks.6.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    hooks = args.hook or ["blocks.6.hook_resid_post"]

    torch.manual_seed(0)
    model = load_model(args.model)
    specs = resolve_hooks(model, hooks)
    stop = stop_layer(specs, model.cfg.n_layers)
    bos = int(model.tokenizer.bos_token_id)
    n_contexts = -(-args.tokens // args.context)
    base_cfg = CacheConfig(model=args.model, hooks=hooks, out="", tokens=args.tokens, context=args.context,
                           batch_size=args.batch_size)
    tokens = make_tokens(base_cfg, model.tokenizer, bos, n_contexts)
    bare_forward(model, tokens[: args.batch_size], hooks, args.batch_size, stop)  # warm-up

    forward_rates, cache_rates = [], []
    for repeat in range(args.repeats):
        forward_rates.append(bare_forward(model, tokens, hooks, args.batch_size, stop))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CacheConfig(**{**base_cfg.__dict__, "out": str(Path(tmp) / "cache")})
            manifest = build_cache(cfg, model=model, progress=False)
            cache_rates.append(tokens.size / manifest["last_run"]["seconds"])
        print(f"repeat {repeat}: forward {forward_rates[-1]:,.0f} tok/s, cache {cache_rates[-1]:,.0f} tok/s",
              file=sys.stderr)
    result = {
        "model": args.model, "hooks": hooks, "stop_at_layer": stop, "batch": f"{args.batch_size}x{args.context}",
        "tokens": int(tokens.size), "threads": torch.get_num_threads(),
        "forward_tokens_per_s": round(statistics.median(forward_rates), 1),
        "cache_tokens_per_s": round(statistics.median(cache_rates), 1),
    }
    result["ratio"] = round(result["cache_tokens_per_s"] / result["forward_tokens_per_s"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
