"""`saewb dashboard`: start the Streamlit app on the analysis store, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from experiments.analysis.store import DEFAULT_STORE, AnalysisStore

APP = Path(__file__).with_name("app.py")


def dashboard_command(store: str, port: int, address: str) -> list[str]:
    """The streamlit command line; the store goes after `--`, where app.py reads it."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", address, "--server.port",
            str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false", "--", "--store", store]


def serve(store: str, port: int, address: str = "127.0.0.1") -> int:
    """Run the app in the foreground until Ctrl-C (which is a normal way to stop it, not an error)."""
    try:
        return subprocess.call(dashboard_command(store, port, address))
    except KeyboardInterrupt:
        return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    AnalysisStore(args.store).con.close()  # a missing or damaged store is one line here, before any server starts
    print(f"sae-workbench dashboard on http://{args.address}:{args.port} (store: {args.store}); Ctrl-C stops it",
          flush=True)
    return serve(args.store, args.port, args.address)


def add_dashboard_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dashboard",
        help="browse the analysis store in a local Streamlit app",
        description="Start the Streamlit dashboard (Overview, Feature browser, Dead features, Prompt inspector, "
        "Steering) over a store built by "
        "`saewb analyze`. It listens on 127.0.0.1 only unless --address says otherwise.",
    )
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"store folder (default: {DEFAULT_STORE})")
    parser.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.set_defaults(func=cmd_dashboard)
    return parser
