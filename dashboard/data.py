"""Where the store is and how it is loaded: once per process (st.cache_resource), shared by every session."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

import sae
from activations.hf_backend import backend_of_hook
from activations.models import load_model
from experiments.analysis.store import DEFAULT_STORE, STORE_FILE, AnalysisStore, StoreError
from sae.devices import resolve_device


def _app_args(argv: list[str] | None) -> argparse.Namespace:
    """What `saewb dashboard` passes after `streamlit run app.py --`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store")
    parser.add_argument("--device")
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args


def store_path(argv: list[str] | None = None) -> str:
    """`--store DIR` after `streamlit run app.py --`, else $SAEWB_STORE, else the demo's store."""
    return _app_args(argv).store or os.environ.get("SAEWB_STORE") or DEFAULT_STORE


def device_name(argv: list[str] | None = None) -> str:
    """Where the pages run the model and the SAEs: `--device` after `--`, else $SAEWB_DEVICE, else auto (CUDA when
    torch sees a GPU); resolved to cpu, cuda or cuda:N."""
    return str(resolve_device(_app_args(argv).device or os.environ.get("SAEWB_DEVICE") or "auto"))


@st.cache_resource(show_spinner=False, max_entries=4)
def _open_store(path: str, mtime: float) -> AnalysisStore:
    """Keyed by the file's mtime too: `saewb analyze` replaces the file, and an open connection would keep
    reading the old one."""
    return AnalysisStore(path)


def get_store() -> AnalysisStore | None:
    """The store, or None after showing in the page how to build one (never a traceback)."""
    path = store_path()
    file = Path(path) / STORE_FILE
    try:
        store = _open_store(path, file.stat().st_mtime if file.exists() else 0.0)
    except StoreError as exc:
        st.error(str(exc))
        return None
    if not store.saes():
        st.error(f"the store at {path} holds no SAE yet: add one with `saewb analyze --sae RUN --activations CACHE "
                 f"--out {path}`")
        return None
    return store


def pick_sae(store: AnalysisStore, key: str = "sae") -> str:
    """A selectbox of the store's SAEs, remembered across pages."""
    names = [s["name"] for s in store.saes()]
    return st.sidebar.selectbox("SAE", names, key=key)


def load_lm(name: str, backend: str = "transformer_lens"):
    """The language model named in the store (loaded once per process; the default one converts offline), on
    the backend its SAE's hook belongs to, on the dashboard's device."""
    return _load_lm(name, backend, device_name())


@st.cache_resource(show_spinner="loading the model ...")
def _load_lm(name: str, backend: str, device: str):
    return load_model(name, device=device, backend=backend)


def load_sae(path: str):
    """The SAE folder on the dashboard's device (loaded once per process)."""
    return _load_sae(path, device_name())


@st.cache_resource(show_spinner=False)
def _load_sae(path: str, device: str):
    return sae.load(path, device=device).eval()


def model_and_sae(store: AnalysisStore, name: str):
    """(model, SAE, hook) for one stored SAE, or None after an error message (model or folder unavailable)."""
    info = store.sae(name)
    try:
        return load_lm(info["model"], backend_of_hook(info["hook"])), load_sae(info["path"]), info["hook"]
    except Exception as exc:  # noqa: BLE001 - any load failure becomes a message in the page, never a traceback
        st.error(f"cannot load the model {info['model']!r} or the SAE at {info['path']} for {name}: {exc}")
        return None
