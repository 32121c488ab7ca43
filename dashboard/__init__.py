"""Streamlit dashboard over the analysis store built by `saewb analyze` (see experiments/analysis/)."""
