"""The `saewb` parser, built from one module per subcommand, and `main()`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dashboard.launch import add_dashboard_parser
from experiments.cli import analyze, cache, calibrate, demo, evaluate, intervene, ioi, push, sweep, train
from experiments.data_parallel import leave_rank
from experiments.user_errors import run_user_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saewb",
        description="sae-workbench: cache transformer activations, train sparse autoencoders, inspect features. "
        "Everything runs offline on the embedded SmolLM2-135M model and corpus by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cache, train, evaluate, calibrate):
        module.add_parser(sub)
    intervene.add_parsers(sub)  # steer, unlearn
    ioi.add_parser(sub)
    sweep.add_sweep_parser(sub)
    analyze.add_analyze_parser(sub)
    add_dashboard_parser(sub)
    demo.add_parser(sub)
    push.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():  # every --out of saewb is a folder
        print(f"saewb {args.command}: error: --out {out} is an existing file; --out names a folder (new or existing)",
              file=sys.stderr)
        return 2
    code = run_user_command(args.command, lambda: args.func(args))
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    if code == 0 and not quiet and getattr(args, "device", None) == "auto" and not torch.cuda.is_available():
        # after the work, so that a refused command stays one line; --quiet and --json keep stderr clean
        print(f"saewb {args.command}: ran on the CPU (--device auto: torch sees no CUDA GPU)", file=sys.stderr)
    return leave_rank(code)
