#!/usr/bin/env bash
# Create .venv-bench: the peers for `make bench` (SAELens, sparsify) plus matplotlib for the figure.
# Kept apart from .venv so peers never become product dependencies. torch is pinned FIRST: a plain
# `torch` requirement would pull a multi-GB CUDA build. transformer-lens stays on the 3.9 line
# (SAELens 6.54 needs transformer-lens < 4; see constraints.txt).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
VENV="${BENCH_VENV:-.venv-bench}"
STAMP="$VENV/.bench-installed"
started=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_PROGRESS_BAR=off
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -c constraints.txt "sae-lens==6.54.*" "eai-sparsify==1.3.3" "transformer-lens<4" matplotlib
touch "$STAMP"
echo "[bench] $VENV ready in $(( $(date +%s) - started )) s"
