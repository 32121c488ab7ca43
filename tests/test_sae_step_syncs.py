"""The training step never makes the host wait on the device (issue 11 §3): metrics and NaN/inf flags stay on it.

On a GPU every `.item()`, `float(t)`, `if t:`, nonzero or boolean-mask index waits until all queued kernels have run.
This machine has no GPU, so HostSyncs stands in for the CUDA sync detector: it records each such call made from
Python (torch's own C++ code is out of its sight) while a label is set.
"""

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import sae
from sae.config import SAEConfig
from sae.registry import TRAINABLE, get_architecture
from sae.sparse_code import SparseCode, Support
from sae.synthetic import planted_dictionary_data
from sae.training.tracking import FeatureTracker

pytestmark = pytest.mark.usefixtures("one_thread")

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")
"""Tensor methods that bring a value (or a data-dependent size) from the device to Python."""
SYNC_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "bincount")
"""torch functions whose output size depends on the data (CUDA must finish before it is known)."""


def _bool_index(args, kwargs) -> bool:
    index = args[0] if args else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostSyncs:
    """Records (label, what, file:line of the caller) for every host sync made from Python while a label is set,
    and in `stacks` the file names of the frames above each (innermost first)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[object, str, str]] = []
        self.stacks: list[tuple[str, ...]] = []
        self.current: object = None
        for name in SYNC_METHODS:
            self._wrap(monkeypatch, torch.Tensor, name, f"Tensor.{name}")
        for name in SYNC_FUNCTIONS:
            self._wrap(monkeypatch, torch, name, f"torch.{name}")
        for name in ("__getitem__", "__setitem__"):
            self._wrap(monkeypatch, torch.Tensor, name, "boolean-mask index", lambda a, k: _bool_index(a[1:], k))
        self._wrap(monkeypatch, torch, "where", "torch.where(condition)", lambda a, k: len(a) + len(k) == 1)

    def _wrap(self, monkeypatch, owner, name, what, when=None) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.current is not None and (when is None or when(args, kwargs)):
                frame = sys._getframe(1)
                self.calls.append((self.current, what, f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"))
                stack = []
                while frame is not None and len(stack) < 12:
                    stack.append(Path(frame.f_code.co_filename).name)
                    frame = frame.f_back
                self.stacks.append(tuple(stack))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    @contextmanager
    def label(self, label: object):
        previous, self.current = self.current, label
        try:
            yield
        finally:
            self.current = previous

    def record(self, trainer) -> None:
        """Label the trainer's calls: ("step", i) inside train_step, ("advance", i) in the rest of step i."""
        train_step, advance = trainer.train_step, trainer.advance

        def step(i, *batch):
            with self.label(("step", i)):
                return train_step(i, *batch)

        def advance_step(i, batch, logger):
            with self.label(("advance", i)):
                return advance(i, batch, logger)

        trainer.train_step, trainer.advance = step, advance_step

    def where(self, kind: str) -> list[tuple[int, str, str]]:
        return [(label[1], what, site) for label, what, site in self.calls if label[0] == kind]


def build(arch="topk", steps=12, **options):
    data = planted_dictionary_data(128 * steps, 16, 32, 2, seed=3).acts
    grads = torch.randn(data.shape, generator=torch.Generator().manual_seed(1))
    defaults = dict(progress=False, prefetch_batches=0, shuffle=False, norm_estimation_batches=2,
                    geometric_median_rows=256)
    return sae.build_trainer(
        data, grads=grads if get_architecture(arch).needs_grads else None, arch=arch, n_features=32, k=2,
        batch_size=128, total_tokens=128 * steps, lr=1e-2, seed=1, **{**defaults, **options},
    )


def test_a_topk_step_never_syncs_and_only_log_and_checkpoint_steps_read_the_device(monkeypatch, tmp_path):
    """TopK with AuxK while no latent can be dead yet: zero syncs in any step. A pure log step reads three times,
    each needed: the NaN/inf record (Trainer.raise_if_non_finite), every metric at once (one tolist), and the tracker's
    max(tokens_since_fired), the bound that keeps AuxK's candidate search (a sync) off the following steps."""
    trainer = build(log_every=5, checkpoint_dir=str(tmp_path), checkpoint_every=4, dead_tokens=10**9)
    syncs = HostSyncs(monkeypatch)
    syncs.record(trainer)
    trainer.run()
    assert syncs.where("step") == []
    # steps 0..11 complete 1..12 steps: checkpoints after 4, 8, 12; logs after 5, 10, 12
    assert sorted({i for i, _, _ in syncs.where("advance")}) == [3, 4, 7, 9, 11]
    for log_only in (4, 9):
        assert [(what, site.split(":")[0]) for i, what, site in syncs.where("advance") if i == log_only] == [
            ("Tensor.__int__", "finite_guard.py"), ("Tensor.tolist", "trainer.py"), ("Tensor.__int__", "tracking.py")
        ]


def test_once_latents_can_be_dead_the_only_syncs_left_in_a_topk_step_are_auxks(monkeypatch):
    """With dead_tokens = 2 batches latents die within the run. AuxK's candidates (the dead latents) and the
    tokens left with fewer than k_aux of them set the sizes of its top-k and its sparse code, so it learns them on
    the host (sae/aux_losses.py: nonzero, boolean masks, the all-chosen and finiteness branches, and the CSR row
    pointer of a ragged code); removing those would change which entries are summed in which order. Nothing
    else in the step syncs."""
    trainer = build(steps=30, log_every=100, dead_tokens=256)
    syncs = HostSyncs(monkeypatch)
    syncs.record(trainer)
    model = trainer.run()
    assert model.training_info["last_metrics"]["dead_frac"] > 0  # the regime this test is about
    in_step = [(call, stack) for call, stack in zip(syncs.calls, syncs.stacks, strict=True) if call[0][0] == "step"]
    assert in_step and all("aux_losses.py" in stack for _, stack in in_step)
    assert min(call[0][1] for call, _ in in_step) >= 2  # before step 2 no latent can be dead: AuxK is skipped


@pytest.mark.parametrize(
    ("arch", "options", "expected"),
    [
        ("gradient_topk", {}, []),
        ("feature_choice", {}, []),
        ("feature_choice", {"fc_capacity": "zipf"}, []),
        # Mutual-Choice's top k*B over the batch keeps the entries at or above a bound; how many there are (often a
        # few more than k*B, at ties) sizes the exact top-k*B among them: one nonzero per step (sae/sparse_code.py).
        ("mutual_choice", {}, [("Tensor.nonzero", "sparse_code.py")]),
    ],
)
def test_the_other_architectures_steps_sync_only_where_a_size_depends_on_the_data(monkeypatch, arch, options, expected):
    """No aux loss (dead_tokens beyond the run): per step, the syncs left by each selection rule. Feature-Choice
    keeps exactly k*B entries on one process, so its nonzero has a static size (torch.nonzero_static)."""
    trainer = build(arch, steps=8, log_every=100, dead_tokens=10**9, **options)
    syncs = HostSyncs(monkeypatch)
    syncs.record(trainer)
    trainer.run()
    for step in range(8):
        assert [(what, site.split(":")[0]) for i, what, site in syncs.where("step") if i == step] == expected, step


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_threshold_updates_make_no_host_sync(monkeypatch, arch):
    model = get_architecture(arch)(SAEConfig(arch=arch, d_in=16, n_features=32, k=2, threshold_start_step=0))
    pre_acts = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    support, _ = model.select_train(pre_acts, None)
    code = SparseCode(support, pre_acts[support.rows, support.cols].relu())
    syncs = HostSyncs(monkeypatch)
    for step in range(3):
        with syncs.label(("observe", step)):
            model.observe(code, step, total_steps=10)
    assert syncs.calls == []
    positive = code.values > 0
    expected = torch.full((32,), float("inf")).scatter_reduce(0, support.cols[positive], code.values[positive], "amin")
    if arch == "mutual_choice":
        expected = code.values[positive].min().reshape(1)
    # the first observation sets theta, the EMA of the same value stays there (up to rounding)
    torch.testing.assert_close(model.threshold, expected, rtol=1e-6, atol=0)
    assert torch.equal(model.threshold_initialized, torch.isfinite(expected))


def test_the_dead_latent_tracker_updates_without_a_sync(monkeypatch):
    tracker = FeatureTracker(n_features=4, dead_tokens=3, fire_threshold=0.5, ema_beta=0.0)
    code = SparseCode(Support.from_topk(torch.tensor([[0, 1], [0, 2]]), 4),
                      torch.tensor([0.9, 0.2, 0.7, 0.5]))
    syncs = HostSyncs(monkeypatch)
    with syncs.label("update"):
        tracker.update(code)
        tracker.update(code)
    assert syncs.calls == []
    assert tracker.tokens_since_fired.tolist() == [0, 4, 4, 4] and tracker.since_fired_bound == 4
    assert tracker.may_be_dead() and tracker.dead_mask().tolist() == [False, True, True, True]
    tracker.refresh_bound()
    assert tracker.since_fired_bound == 4


@pytest.mark.parametrize("arch", TRAINABLE)
def test_how_often_a_run_logs_does_not_change_what_it_computes(arch):
    """log_every=1 reads the device every step (and tightens the dead-latent bound every step), log_every=7 every
    7th: the weights come out bit-identical, and so do the metrics of the steps both log. dead_tokens=256 makes
    latents die, so AuxK runs; and with fp32 on this CPU these are the weights the step computed before it was made
    sync-free (checked against the previous trainer when the change was made)."""
    runs = {}
    for every in (1, 7):
        logged = {}
        model = build(arch, steps=30, log_every=every, dead_tokens=256,
                      log_fn=lambda step, metrics, logged=logged: logged.update({step: metrics})).run()
        runs[every] = (model.state_dict(), logged)
    (weights_1, logs_1), (weights_7, logs_7) = runs[1], runs[7]
    for name, tensor in weights_1.items():
        assert torch.equal(tensor, weights_7[name]), name
    assert sorted(logs_7) == [7, 14, 21, 28, 30]
    for step, metrics in logs_7.items():
        assert {k: v for k, v in metrics.items() if k != "tokens_per_s"} == {
            k: v for k, v in logs_1[step].items() if k != "tokens_per_s"
        }
