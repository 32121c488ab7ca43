"""benchmarks/bench_gpu.py (make bench-gpu), checked on the CPU: its device-made synthetic rows and its arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture
def bench_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu

    return bench_gpu


def test_planted_rows_sum_k_distinct_atoms_with_coefficients_in_range_and_zipf_frequencies(bench_gpu):
    d, n_atoms, k, n = 40, 24, 3, 3000
    rows = bench_gpu.planted_rows(n, d, n_atoms, k, torch.device("cpu"), seed=5)
    assert rows.shape == (n, d)
    g = torch.Generator().manual_seed(5)  # the dictionary is the generator's first draw
    dictionary = torch.randn(n_atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    coefs = torch.linalg.lstsq(dictionary.double().T, rows.double().T).solution.T  # d > atoms: exact
    nonzero = coefs.abs() > 1e-4
    assert torch.equal(nonzero.sum(dim=1), torch.full((n,), k))
    assert float(coefs[nonzero].min()) >= 0.5 - 1e-4 and float(coefs[nonzero].max()) <= 1.5 + 1e-4
    counts = nonzero.sum(dim=0)
    assert counts[0] > counts[n_atoms // 2] > counts[-1]  # Zipf(1): the first atoms are drawn most
    assert torch.equal(rows, bench_gpu.planted_rows(n, d, n_atoms, k, torch.device("cpu"), seed=5))


def test_bench_gpu_runs_on_the_cpu_and_writes_its_tables(tmp_path):
    out = tmp_path / "bench-gpu"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "16x64x4", "--batch-size",
                           "64", "--steps", "2", "--repeats", "1", "--heldout", "256", "--peers", "none",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["precision"] for r in results["results"]] == ["fp32", "bf16"] and results["side_by_side"] == []
    assert all(r["tokens_per_s"] > 0 and 0 < r["heldout_fvu"] < 1 for r in results["results"])
    assert "| 16 | 64 | 4 | fp32 |" in (out / "results.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "cpu", "--peers", "saelens,dictionary_learning"], "--peers: unknown ['dictionary_learning']"),
    (["--device", "cpu", "--shapes", "16x64"], "--shapes must be comma-separated dxFxk triples"),
    (["--device", "tpu"], "--device: device must be auto"),
    *([(["--device", "cuda"], "--device: device 'cuda': torch sees no CUDA GPU")] if not torch.cuda.is_available()
      else []),
])
def test_bench_gpu_rejects_bad_arguments_with_one_clear_error(tmp_path, args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


def test_save_data_replaces_both_files_whole_and_leaves_the_old_ones_when_a_write_fails(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_protocol
    import numpy as np

    train, heldout = np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((2, 3), np.float32)
    bench_protocol.save_data(tmp_path, train, heldout)
    assert np.array_equal(np.load(tmp_path / "train.npy"), train)
    assert np.array_equal(np.load(tmp_path / "heldout.npy"), heldout)

    def broken_save(fh, array):
        fh.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(bench_protocol.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        bench_protocol.save_data(tmp_path, train * 2, heldout * 2)
    assert np.array_equal(np.load(tmp_path / "train.npy"), train)  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout.npy", "train.npy"]  # no temp file left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_gemm_rate_counts_2bdf_flops_in_the_asked_dtype(bench_gpu, dtype, monkeypatch):
    import bench_training

    seen = []
    real = torch.matmul
    monkeypatch.setattr(bench_training.torch, "matmul", lambda a, w, out: seen.append((a.dtype, out.shape)) or
                        real(a, w, out=out))
    clock = iter(range(100))
    monkeypatch.setattr(bench_training.time, "perf_counter", lambda: float(next(clock)))  # every product: 1 s
    rate = bench_gpu.gemm_flops(8, 4, 16, reps=3, dtype=dtype, warmups=2)
    assert rate == 2 * 8 * 4 * 16 and seen == [(dtype, (8, 16))] * 5
