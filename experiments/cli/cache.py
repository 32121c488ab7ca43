"""`saewb cache`: run a model over a corpus into a sharded activation cache."""

from __future__ import annotations

import argparse

from activations import CacheConfig, build_cache
from experiments.arguments import add_dataclass_arguments, dataclass_from_args


def run(args: argparse.Namespace) -> int:
    build_cache(dataclass_from_args(CacheConfig, args), progress=not args.quiet)
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "cache",
        help="run a model over a corpus and write a sharded, resumable activation cache",
        description="Run a model over a corpus and write memory-mappable activation shards, token ids and a "
        "manifest: a transformer_lens model by hook name (default), or with --backend hf any Hugging Face causal LM "
        "by module path (model.layers.6 is the residual stream after block 6; MODULE:input reads a module's input, "
        "e.g. model.layers.6.self_attn.o_proj:input for the heads' outputs). Rerunning the same command resumes"
        " after the last complete shard; a complete cache is not recomputed; a folder holding a different cache is "
        "refused.",
    )
    add_dataclass_arguments(parser, CacheConfig, required=("out",))
    parser.add_argument("--hook", dest="hooks", action="append", help="alias of --hooks")
    parser.add_argument("--dataset", dest="corpus", help="alias of --corpus")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
