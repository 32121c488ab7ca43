"""benchmarks/profile_step.py (make profile-step): its wall-clock phase timers attribute nested time once and leave
the trainer, the model and torch.Tensor as they found them."""

import time
from pathlib import Path

import pytest
import torch

import sae

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def profile_step(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import profile_step

    return profile_step


def test_a_nested_phase_is_subtracted_from_the_phase_around_it(profile_step):
    phases = profile_step.Phases()
    inner = phases.wrap("inner", lambda: time.sleep(0.05))

    def outer_body():
        time.sleep(0.02)
        inner()

    outer = phases.wrap("outer", outer_body)
    outer()
    assert phases.seconds["inner"][0] >= 0.05
    # outer's own time is its 20 ms sleep, not the 70 ms it spanned (a sleep may overshoot)
    assert 0.02 <= phases.seconds["outer"][0] < 0.065  # not subtracted: >= 0.07


def test_phase_timers_cover_the_step_and_are_removed_afterwards(profile_step):
    rows = torch.randn(8 * 64, 32, generator=torch.Generator().manual_seed(0))
    trainer = sae.build_trainer(rows, arch="topk", n_features=128, k=4, batch_size=64, total_tokens=8 * 64,
                                shuffle=False, progress=False, log_every=10**9, dead_tokens=64, seed=0)
    trainer.initialize()
    backward = torch.Tensor.backward
    phases = profile_step.Phases()
    batches = iter(trainer.stream.batches())
    with phases.installed(trainer):
        for step in range(3):
            trainer.train_step(step, *next(batches))
    expected = {"normalise", "encoder GEMM + gather", "selection", "decode + loss", "backward (all losses)",
                "decoder-gradient projection", "gradient norm", "Adam", "decoder renormalisation",
                "counters + thresholds", "aux loss (forward)"}  # dead_tokens=64: AuxK is on from step 1
    assert expected <= set(phases.seconds)
    assert len(phases.seconds["Adam"]) == 3 and len(phases.seconds["counters + thresholds"]) == 6
    assert torch.Tensor.backward is backward
    for owner, attr in ((trainer.sae, "normalize"), (trainer, "losses"), (trainer.optimizer, "step")):
        assert attr not in vars(owner), f"{attr} left patched on {type(owner).__name__}"
    trainer.train_step(3, *next(batches))  # the unwrapped step still runs
    assert len(phases.seconds["Adam"]) == 3


def test_profile_step_prints_the_phase_table(profile_step, capsys):
    assert profile_step.main(["--shapes", "256x8", "--d-in", "32", "--batch-size", "64", "--steps", "2",
                              "--warmup", "2", "--top", "3", "--dead-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "of the one-GEMM floor" in out
    assert "phase (wall clock, no profiler)" in out and "backward (all losses)" in out
    assert "(step outside these phases)" in out
