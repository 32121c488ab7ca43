"""`saewb analyze`: build or extend the dashboard's store."""

from __future__ import annotations

import argparse

from experiments.analysis.pipeline import analyze
from experiments.analysis.store import DEFAULT_STORE


def cmd_analyze(args: argparse.Namespace) -> int:
    model = None if args.model.lower() == "none" else args.model
    path = analyze(args.sae, args.activations, model=model, out=args.out, name=args.name, hook=args.hook,
                   top_n=args.top_n, window=args.window, batch_size=args.batch_size, progress=not args.quiet,
                   device=args.device)
    print(f"wrote {path}; browse it with `saewb dashboard --store {args.out}`")
    return 0


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """`saewb analyze`: build or extend the dashboard's store."""
    parser = subparsers.add_parser(
        "analyze",
        help="analyse an SAE's features on an activation cache into the dashboard's store",
        description="Stream a cache through an SAE (in order, bounded memory) and write per-feature density, "
        "mean/max activation, top-N contexts with per-token activations, quantile samples, an activation "
        "histogram, logit-lens tokens and decoder-cosine neighbours, plus the training log's dead fraction, into "
        "STORE/store.sqlite. Analysing another SAE into the same store adds it (same --name replaces it).",
    )
    parser.add_argument("--sae", required=True,
                        help="SAE run folder (as written by `saewb train`), or hf://ORG/REPO[/SUBFOLDER][@REVISION]")
    parser.add_argument("--activations", required=True, help="activation cache folder (ideally held-out)")
    parser.add_argument("--model", default="auto", help="model for token strings and the logit lens (default: "
                        "auto, the cache's own model; 'none' skips both and shows token ids)")
    parser.add_argument("--out", default=DEFAULT_STORE, help=f"store folder (default: {DEFAULT_STORE})")
    parser.add_argument("--name", help="name of the SAE in the store (default: the SAE folder's name)")
    parser.add_argument("--hook", help="hook of a multi-hook cache (default: the SAE's hook_name)")
    parser.add_argument("--top-n", type=int, default=20, help="top activating contexts kept per feature (default 20)")
    parser.add_argument("--window", type=int, default=8, help="tokens each side of the max (default 8)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows encoded at a time (default 4096)")
    parser.add_argument("--device", default="auto", help="where the SAE encodes the cache: auto (CUDA when torch "
                        "sees a GPU, else CPU), cpu, cuda or cuda:N; the statistics and the store stay on the CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_analyze)
    return parser
