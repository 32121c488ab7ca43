"""What reading the step's metrics every step costs: TopK steps/s at log_every=1 vs log_every=100, alternating runs.

    .venv/bin/python benchmarks/step_syncs.py --device cuda [--autocast bf16] [--steps 200] [--repeats 3]
    .venv/bin/python benchmarks/step_syncs.py --d 16 --n-features 64 --steps 3        # smoke check, any machine

Defaults: d=576, F=16,384, k=32, batch 4096 (the GPU benchmark's small shape). A log step reads the device three
times (the NaN/inf record, the metrics, the dead-latent bound: sae/training/trainer.py); other steps never read it,
except for what AuxK needs once latents may be dead (--dead-tokens sets when; default the trainer's, 20% of the
run). The activations are random Gaussian rows made on the device (a few batches, cycled), so the copy from the host
is not in the timing. Each run builds a fresh trainer and times `Trainer.run()` after its initialisation; the first
run is a warm-up and is not reported. Prints one line per run, then one JSON line: median steps/s of each setting
and their ratio (log_every=100 over log_every=1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sae
from sae.devices import resolve_device


def timed_run(x: torch.Tensor, args: argparse.Namespace, log_every: int) -> float:
    """Steps per second of one run's training loop (initialisation excluded)."""
    trainer = sae.build_trainer(
        x, arch="topk", n_features=args.n_features, k=args.k, batch_size=args.batch_size,
        total_tokens=args.steps * args.batch_size, seed=0, progress=False, log_every=log_every,
        device=args.device, autocast=args.autocast, dead_tokens=args.dead_tokens, warmup_steps=0,
        decay_fraction=0.0, norm_estimation_batches=2, geometric_median_rows=min(4096, x.shape[0]),
    )
    return args.steps / timed_loop(trainer)[0]


def timed_loop(trainer: sae.Trainer) -> tuple[float, sae.SAE]:
    """(seconds of the trainer's training loop, the trained SAE): initialised first, outside the clock."""
    trainer.initialize()
    trainer.resume = lambda: True  # type: ignore[method-assign]  # time the loop only: initialised above
    synchronize(trainer.device)
    began = time.perf_counter()
    model = trainer.run()  # its last step is a log step, which reads the device: the queue is drained when it returns
    synchronize(trainer.device)
    return time.perf_counter() - began, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--autocast", default="none", help="none, bf16 or fp16 (default: none)")
    parser.add_argument("--d", type=int, default=576, help="activation width (default: 576)")
    parser.add_argument("--n-features", type=int, default=16_384, help="latents F (default: 16384)")
    parser.add_argument("--k", type=int, default=32, help="latents per token (default: 32)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per step (default: 4096)")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (default: 200)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating log_every=1 / log_every=100 pairs")
    parser.add_argument("--dead-tokens", type=int, default=None,
                        help="tokens without firing before a latent is dead (default: the trainer's)")
    parser.add_argument("--batches", type=int, default=4, help="distinct random batches, cycled (default: 4)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
    args.k = min(args.k, args.n_features - 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}), torch {torch.__version__}, d={args.d} F={args.n_features} k={args.k} "
          f"B={args.batch_size}, {args.steps} steps a run, autocast {args.autocast}")
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batches * args.batch_size, args.d, device=device, generator=generator)
    timed_run(x, args, 100)  # warm-up: allocator, kernels, (on CUDA) the context and cuBLAS handles
    rates: dict[int, list[float]] = {1: [], 100: []}
    for repeat in range(args.repeats):
        for log_every in (1, 100):
            rate = timed_run(x, args, log_every)
            rates[log_every].append(rate)
            tokens = rate * args.batch_size
            print(f"repeat {repeat}  log_every={log_every:<3d}  {rate:8.2f} steps/s  {tokens:12,.0f} tok/s")
    median = {every: statistics.median(values) for every, values in rates.items()}
    print(json.dumps({
        "device": name, "autocast": args.autocast, "d": args.d, "n_features": args.n_features, "k": args.k,
        "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
        "steps_per_s_log_every_1": median[1], "steps_per_s_log_every_100": median[100],
        "ratio_100_over_1": median[100] / median[1],
    }))


if __name__ == "__main__":
    main()
