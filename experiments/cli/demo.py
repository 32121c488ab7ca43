"""`saewb demo`: the main job on the embedded default model and corpus, then the dashboard."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from dashboard.launch import serve
from experiments.arguments import add_dataclass_arguments, dataclass_from_args
from experiments.demo import DemoConfig, progress_printer, run_demo


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(DemoConfig, args)
    say = progress_printer()
    run_demo(cfg, say)
    serve_dashboard(cfg, Path(cfg.out) / "store", say)
    return 0


def serve_dashboard(cfg: DemoConfig, store: Path, say: Callable[[str], None]) -> None:
    """Serve the dashboard when a person is watching; scripted runs print the command instead of blocking."""
    command = f"saewb dashboard --store {store} --port {cfg.port}"
    scripted = os.environ.get("SAEWB_NO_DASHBOARD") or os.environ.get("CI") or not sys.stdin.isatty()
    if not cfg.dashboard or scripted:
        say(f"done. Browse the features with: {command}")
        return
    say(f"done. Dashboard on http://127.0.0.1:{cfg.port} (Ctrl-C stops it; later: {command})")
    serve(str(store), cfg.port, device=cfg.device)


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "demo",
        help="the main job on the embedded default model and corpus",
        description="Cache SmolLM2-135M activations (offline) at blocks.6.hook_resid_post, train TopK, "
        "Mutual-Choice, Feature-Choice and g-SAE at equal mean L0, and print the comparison table "
        "(held-out FVU, L0, dead/dense fractions, CE recovered, KL). Finished steps are reused on a rerun.",
    )
    add_dataclass_arguments(parser, DemoConfig)
    parser.set_defaults(func=run)
