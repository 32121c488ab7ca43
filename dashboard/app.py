"""The dashboard's entry point: `streamlit run dashboard/app.py -- --store DIR` (or `saewb dashboard`)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run` puts this file's folder, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashboard.navigation import pages  # noqa: E402

st.set_page_config(page_title="sae-workbench", layout="wide")
st.navigation(list(pages().values())).run()
