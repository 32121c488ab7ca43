"""Data-parallel training (2 gloo ranks on CPU) equals single-process training on the same data.

The ranks are real processes joined by torch.distributed over a file rendezvous; every comparison
is in float64 against one process training on the global batch.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import data_parallel
from sae.api import build_trainer
from sae.distributed import SINGLE_PROCESS, Collectives
from sae.errors import SAEConfigError
from tests.conftest import write_cache
from tests.ddp_worker import ARCHS, D, F, K, _data, _train

REPO = Path(__file__).resolve().parents[1]

def run_process_group(cmd: list[str], env: dict[str, str], wait: bool = True):
    """Start cmd in its own session, so a hang can be killed with every process it started."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if wait:
        finish(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for proc (killing its whole process group after `timeout` s); returns its stderr."""
    try:
        proc.stdout_text, proc.stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout_text, proc.stderr = proc.communicate()
        pytest.fail(f"{proc.args} hung for {timeout} s and was killed: {proc.stderr[-2000:]}")
    return proc.stderr


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two real processes (tests/ddp_worker.py) joined by a gloo process group over a file rendezvous."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker = str(REPO / "tests" / "ddp_worker.py")
    procs = [
        run_process_group([sys.executable, worker, str(rank), "2", str(out / "rendezvous"), str(out)], env, wait=False)
        for rank in range(2)
    ]
    errors = [finish(p) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("arch", ARCHS)
def test_two_gloo_ranks_match_single_process_training(two_ranks, arch):
    single = _train(arch, SINGLE_PROCESS)
    expected = single.sae.state_dict()
    for rank, results in enumerate(two_ranks):
        got = results[arch]
        for name, value in expected.items():
            if value.is_floating_point():
                assert torch.allclose(got["state"][name], value, rtol=1e-9, atol=1e-11), f"rank {rank}: {name}"
            else:
                assert torch.equal(got["state"][name], value), f"rank {rank}: {name}"
        assert torch.equal(got["tokens_since_fired"], single.tracker.tokens_since_fired)
        assert torch.allclose(got["density_ema"], single.tracker.density_ema, rtol=1e-12)
    if arch != "topk":  # the thresholds were learned, so the comparison above covered them
        assert bool(single.sae.threshold_initialized.any())


def test_global_kth_largest_sees_every_rank(two_ranks):
    assert [float(r["kth"]) for r in two_ranks] == [16.0, 16.0]


def test_batch_size_must_split_evenly_over_ranks():
    class ThreeRanks(Collectives):
        world_size = 3

    with pytest.raises(SAEConfigError, match="batch_size=64 must be a multiple of the number of ranks \\(3\\)"):
        build_trainer(_data().float(), arch="topk", n_features=F, k=K, batch_size=64, collectives=ThreeRanks())


def test_cache_ranks_read_disjoint_chunks_covering_the_cache(tmp_path):
    from activations.reader import CHUNK_ROWS, load_cache

    rows = 3 * CHUNK_ROWS + 100
    acts = torch.arange(rows, dtype=torch.float32).unsqueeze(1).repeat(1, 4)
    cache = load_cache(write_cache(tmp_path / "cache", acts, shard_rows=2 * CHUNK_ROWS))
    seen = []
    for rank in range(2):
        batches = list(cache.iter_batches(512, shuffle=True, seed=3, rank=rank, world_size=2))
        seen.append(torch.cat(batches)[:, 0].long())
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert sorted(seen[0].tolist() + seen[1].tolist()) == list(range(rows))
    with pytest.raises(ValueError, match="rank must be in \\[0, world_size\\)"):
        next(cache.iter_batches(512, rank=2, world_size=2))


@pytest.mark.parametrize(
    "entry,arch", [(["experiments.train"], "topk"), (["experiments.cli", "train"], "mutual_choice")]
)
def test_torchrun_trains_from_a_cache_with_two_ranks(tmp_path, entry, arch):
    """The user-facing paths: torchrun -m experiments.train / saewb train write one SAE and eval.json (rank 0).

    Mutual-Choice also checks that rank 0's batch-mode evaluation no longer waits on the other rank.
    """
    acts = torch.randn(8 * 256, D, generator=torch.Generator().manual_seed(0))
    cache = write_cache(tmp_path / "cache", acts, shard_rows=1024)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "activations": str(cache), "arch": arch, "n_features": F, "k": K, "out": str(tmp_path / "run"),
        "batch_size": 256, "wandb": False, "progress": False, "eval_tokens": 512,
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = run_process_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", *entry, "--config", str(config)], env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert metrics["data_parallel_ranks"] == 2
    if arch == "mutual_choice":
        assert metrics["batch_mode"]["l0"] == pytest.approx(K)
    assert metrics["train_tokens"] == 8 * 256
    assert (tmp_path / "run" / "sae_weights.safetensors").exists()
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) >= 1


def test_each_rank_takes_its_local_gpu_and_a_backend_for_cpu_and_cuda_tensors(monkeypatch):
    monkeypatch.setattr(data_parallel.torch.cuda, "is_available", lambda: False)
    assert data_parallel.backend_for_this_machine() == "gloo"
    chosen = []
    monkeypatch.setattr(data_parallel.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(data_parallel.torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert data_parallel.backend_for_this_machine() == "cpu:gloo,cuda:nccl" and chosen == [3]
