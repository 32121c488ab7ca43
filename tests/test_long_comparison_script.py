"""experiments/long_comparison.sh's parameters, run against stand-ins for saewb and python that record their calls."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "long_comparison.sh"


def calls(tmp_path: Path, **env: str) -> list[str]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    for name in ("saewb", "python"):
        stub = bin_dir / name
        stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$CALLS"\n')
        stub.chmod(0o755)
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                          env={**os.environ, "BIN": str(bin_dir), "CALLS": str(log), "OUT": str(tmp_path / "out"),
                               **env})
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


def test_the_default_run_builds_four_caches_that_follow_each_other_and_three_ce_passes(tmp_path):
    lines = calls(tmp_path)
    caches = [line for line in lines if line.startswith("saewb cache")]
    assert len(caches) == 4 and "--tokens 1100000" in caches[0] and "--skip-contexts" not in caches[0]
    assert ["--skip-contexts 8594" in caches[1], "--skip-contexts 9618" in caches[2],
            "--skip-contexts 9746" in caches[3]] == [True] * 3
    compares = [line for line in lines if line.startswith("python -m experiments.compare")]
    assert len(compares) == 4 and all("--grads-activations" in line for line in compares)
    assert compares[1].endswith("--runs topk mutual_choice mutual_choice+per_token_standardize gradient_topk "
                                "topk@grads-cache")
    assert compares[2].endswith("--runs feature_choice feature_choice+zipf mutual_choice+aux_zipf")


@pytest.mark.parametrize("other_runs", ["", "feature_choice"])
def test_the_2m_token_check_skips_the_gradient_caches_and_an_empty_other_runs_skips_their_pass(tmp_path, other_runs):
    lines = calls(tmp_path, CORPUS="default-large", CACHE_TOKENS="2200000", TOKENS="2097152", KS="32",
                  WITH_GRADS="0", CLAIM_RUNS="topk mutual_choice+per_token_standardize", OTHER_RUNS=other_runs)
    caches = [line for line in lines if line.startswith("saewb cache")]
    assert len(caches) == 2 and "--corpus default-large" in caches[0] and "--tokens 2200000" in caches[0]
    assert "--skip-contexts 17188" in caches[1]  # ceil(2,200,000 / 128) training contexts
    compares = [line for line in lines if line.startswith("python -m experiments.compare")]
    assert not any("grads" in line for line in compares) and all("--total-tokens 2097152" in c for c in compares)
    assert compares[1].endswith("--ce-tokens 102400 --runs topk mutual_choice+per_token_standardize")
    assert len(compares) == (3 if other_runs == "" else 4) and compares[-1].endswith("--report-only")
