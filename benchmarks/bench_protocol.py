"""The measurement protocol every training runner of `bench_training.py` shares.

Each runner (train_ours.py, train_saelens.py, train_sparsify.py) is its own process, so peak RSS is
per run. It reads the same exported batches in the same order (`load_data`), marks the end of
each step on a `StepClock` (the first `warmup` steps are run but not timed), reads peak RSS just before
training (imports, data and model: `rss_before_training_mb`) and right after it (before the held-out
evaluation, whose [rows, F] latents are not training memory),
computes FVU on the held-out rows with `heldout_fvu`, and prints one JSON line with `emit`.
Imports only numpy and torch, so it runs in the product venv and in the peers' .venv-bench alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

TRAIN_FILE = "train.npy"
HELDOUT_FILE = "heldout.npy"
EVAL_CHUNK_ROWS = 4096


def runner_args(description: str) -> argparse.Namespace:
    """The CLI every runner takes; bench_training.py passes the same values to all three."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True, help=f"folder holding {TRAIN_FILE} and {HELDOUT_FILE}")
    parser.add_argument("--arch", required=True, help="architecture name in this framework")
    parser.add_argument("--steps", type=int, required=True, help="optimiser steps (warm-up steps included)")
    parser.add_argument("--batch-size", type=int, required=True, help="rows per step")
    parser.add_argument("--n-features", type=int, required=True, help="latents F")
    parser.add_argument("--k", type=int, required=True, help="active latents per token (mean per token for BatchTopK)")
    parser.add_argument("--lr", type=float, required=True, help="constant Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--warmup-steps", type=int, default=1, help="leading steps run but not timed")
    parser.add_argument("--dead-tokens", type=int, required=True,
                        help="a latent is dead (AuxK candidate) after this many tokens without firing")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="framework-specific extra setting (ours: any sae.train option)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N: the SAE and every batch live there (moved before the clock starts)")
    args = parser.parse_args()
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be in [0, steps), got {args.warmup_steps} with --steps {args.steps}")
    return args


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> dict; values are read as JSON when they parse (1e-8, false, 3), else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option needs KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def load_data(folder: Path, steps: int, batch_size: int, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(train rows [steps*B, d], held-out rows [H, d]) as float32 tensors, fully in memory (on `device`) in every
    runner."""
    train = np.load(folder / TRAIN_FILE)
    heldout = np.load(folder / HELDOUT_FILE)
    need = steps * batch_size
    if train.shape[0] < need:
        raise SystemExit(f"{folder / TRAIN_FILE} has {train.shape[0]} rows; {steps} steps of {batch_size} need {need}")
    return (torch.from_numpy(np.ascontiguousarray(train[:need], dtype=np.float32)).to(device),
            torch.from_numpy(np.ascontiguousarray(heldout, dtype=np.float32)).to(device))


def save_data(folder: Path, train: np.ndarray, heldout: np.ndarray) -> None:
    """Write TRAIN_FILE and HELDOUT_FILE, each under a temp name renamed into place, so a killed export never
    leaves a half-written file that load_data would read."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((TRAIN_FILE, train), (HELDOUT_FILE, heldout)):
        tmp = folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def batches(train: Tensor, batch_size: int) -> list[Tensor]:
    """Batch i is rows [i*B, (i+1)*B) of the exported order (views, no copies)."""
    return list(train.split(batch_size))


class StepClock:
    """Wall-clock marks: `start()` before step 0, `mark()` after every step. On CUDA each one first waits for the
    device's queued work (every framework pays that one synchronisation per step alike)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.started: float | None = None
        self.marks: list[float] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.started = self._now()

    def mark(self, *_: Any) -> None:
        self.marks.append(self._now())

    def loop_seconds(self, warmup: int) -> float:
        """Seconds from the end of the warm-up steps to the end of the last step."""
        if self.started is None or not self.marks:
            raise RuntimeError("the step clock saw no steps")
        begin = self.marks[warmup - 1] if warmup > 0 else self.started
        return self.marks[-1] - begin


def peak_rss_mb() -> float:
    """High-water resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb(device: str) -> float | None:
    """High-water GPU memory of this process so far (torch.cuda.max_memory_allocated); None off CUDA. The runners
    read it where they read peak RSS: right after training, before any inference copy or held-out latents."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None


Reconstruct = Callable[[Tensor], tuple[Tensor, Tensor]]
"""x [rows, d] -> (x_hat [rows, d], active latents per row [rows])."""


@torch.no_grad()
def heldout_fvu(reconstruct: Reconstruct, heldout: Tensor) -> tuple[float, float]:
    """(FVU, mean L0) over the held-out rows, in float64, chunked like training batches.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with mean(x) the held-out mean; `reconstruct`
    maps a chunk x to (x_hat, active latents per row) with the framework's inference rule.
    """
    x64 = heldout.double()
    total = (x64 - x64.mean(dim=0)).pow(2).sum().item()
    err, active = 0.0, 0.0
    for x in heldout.split(EVAL_CHUNK_ROWS):
        x_hat, n_active = reconstruct(x)
        err += (x.double() - x_hat.double()).pow(2).sum().item()
        active += float(n_active.double().sum())
    return err / total, active / heldout.shape[0]


def emit(
    args: argparse.Namespace,
    framework: str,
    version: str,
    clock: StepClock,
    heldout: Tensor,
    reconstruct: Reconstruct,
    reconstruct_batch_mode: Reconstruct | None = None,
    **fields: Any,
) -> None:
    """Evaluate on the held-out rows and print the run's one JSON line (last line of stdout).

    `reconstruct` is the framework's inference rule; `reconstruct_batch_mode`, for batch-level
    architectures, its training rule on held-out batches. Both go through `heldout_fvu`, so every
    framework is scored by the same code.
    """
    fields["fvu_heldout"], fields["l0_heldout"] = heldout_fvu(reconstruct, heldout)
    fields["heldout_rows"] = heldout.shape[0]
    if reconstruct_batch_mode is not None:
        fields["fvu_heldout_batch_mode"], fields["l0_heldout_batch_mode"] = heldout_fvu(
            reconstruct_batch_mode, heldout
        )
    timed_steps = args.steps - args.warmup_steps
    loop_s = clock.loop_seconds(args.warmup_steps)
    result = {
        "framework": framework,
        "framework_version": version,
        "arch": args.arch,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "batch": args.batch_size,
        "n_features": args.n_features,
        "k": args.k,
        "lr": args.lr,
        "tokens_per_s": timed_steps * args.batch_size / loop_s,
        "loop_s": loop_s,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": str(args.device),
        **fields,
    }
    if "total_s" in result:
        result["tokens_per_s_total"] = args.steps * args.batch_size / result["total_s"]
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
