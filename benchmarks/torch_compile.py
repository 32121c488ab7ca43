"""Does torch.compile pay for the training step? Eager vs compiled `Trainer.losses`, alternating runs.

    .venv/bin/python benchmarks/torch_compile.py [--data runs/bench/data/train.npy] [--steps 14]

Reads the rows `make bench` exported (SmolLM2 blocks.6.hook_resid_post), trains TopK (F=9216, k=32,
batch 4096) and prints tokens/s over the steps after the first three (compilation happens in step 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import sae


def run(x: torch.Tensor, steps: int, compiled: bool) -> tuple[float, float]:
    """(seconds of the first step, tokens/s over steps 4..steps)."""
    marks: list[float] = []
    trainer = sae.build_trainer(
        x[: steps * 4096], arch="topk", n_features=9216, k=32, batch_size=4096, seed=0, shuffle=False,
        progress=False, warmup_steps=0, decay_fraction=0.0, log_every=1,
        log_fn=lambda *_: marks.append(time.perf_counter()),
    )
    if compiled:
        trainer.losses = torch.compile(trainer.losses)  # type: ignore[method-assign]
    trainer.initialize()
    trainer.resume = lambda: True  # type: ignore[method-assign]  # time the loop only
    began = time.perf_counter()
    trainer.run()
    return marks[0] - began, (steps - 4) * 4096 / (marks[-1] - marks[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/bench/data/train.npy"),
                        help="float32 rows [N, 576] (written by `make bench`)")
    parser.add_argument("--steps", type=int, default=14, help="steps per run (at least 6)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating eager/compiled pairs")
    args = parser.parse_args()
    x = torch.from_numpy(np.load(args.data)[: args.steps * 4096].astype(np.float32))
    for _ in range(args.repeats):
        for compiled in (False, True):
            first, rate = run(x, args.steps, compiled)
            print(f"{'compiled' if compiled else 'eager':8s} first step {first:5.1f} s, {rate:,.0f} tokens/s")


if __name__ == "__main__":
    main()
