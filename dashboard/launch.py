"""`saewb dashboard`: start the Streamlit app on the analysis store, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from activations.devices import DEVICE_HELP
from experiments.analysis.store import DEFAULT_STORE, AnalysisStore
from sae.devices import resolve_device

APP = Path(__file__).with_name("app.py")


def dashboard_command(store: str, port: int, address: str, device: str = "auto") -> list[str]:
    """The streamlit command line; the store and the device go after `--`, where app.py reads them."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", address, "--server.port",
            str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false", "--", "--store", store,
            "--device", device]


def serve(store: str, port: int, address: str = "127.0.0.1", device: str = "auto") -> int:
    """Run the app in the foreground until Ctrl-C (which is a normal way to stop it, not an error)."""
    try:
        return subprocess.call(dashboard_command(store, port, address, device))
    except KeyboardInterrupt:
        return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))  # a device this machine lacks is one line, before any server starts
    AnalysisStore(args.store).con.close()  # so is a missing or damaged store
    print(f"sae-workbench dashboard on http://{args.address}:{args.port} (store: {args.store}, device: {device}); "
          "Ctrl-C stops it", flush=True)
    return serve(args.store, args.port, args.address, device)


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
    parser.add_argument("--device", default="auto",
                        help=f"where the pages run the model and the SAEs (steering, IOI, inspector): {DEVICE_HELP}")
    parser.set_defaults(func=cmd_dashboard)
    return parser
