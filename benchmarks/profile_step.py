"""Where a training step's time goes, against its one-GEMM floor (issue 11, item 8).

    .venv/bin/python benchmarks/profile_step.py                        # F=9216, k=32 and F=32768, k=64
    .venv/bin/python benchmarks/profile_step.py --shapes 9216x32 --steps 8 --top 25

For each shape (n_features x k) it trains our real Trainer (`sae.build_trainer`, sparse kernels, AuxK with dead
latents found after --dead-tokens) on Gaussian rows of width --d-in, times --steps steps after --warmup steps,
and reads torch.profiler's per-op self CPU time over those steps. In the same run it times the encoder's forward
GEMM alone ([B, d] @ [d, F] into a preallocated output, 2*B*d*F FLOPs): the one-GEMM floor, which no exact TopK
step can beat. Printed: tokens/s, the floor's tokens/s, our fraction of it, and the ops that cost the most.
Run it on a quiet machine (no other heavy job): the fraction is a ratio of times measured minutes apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_training import gemm_flops
from torch.profiler import ProfilerActivity, profile

import sae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="9216x32,32768x64", help="n_features x k, comma-separated")
    parser.add_argument("--d-in", type=int, default=576, help="activation width (default 576, SmolLM2-135M)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--arch", default="topk")
    parser.add_argument("--steps", type=int, default=8, help="timed (and profiled) steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (past --dead-tokens: AuxK on)")
    parser.add_argument("--dead-tokens", type=int, default=24_576, help="AuxK's dead-latent window (as make bench)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top", type=int, default=15, help="ops listed per shape")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer option, e.g. sparse_kernels=false (repeatable)")
    return parser.parse_args(argv)


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def gemm_seconds(batch: int, d_in: int, n_features: int) -> float:
    """Median seconds of the encoder's forward GEMM into a preallocated output (make bench's measurement)."""
    return 2 * batch * d_in * n_features / gemm_flops(batch, d_in, n_features)


def profile_shape(args: argparse.Namespace, n_features: int, k: int) -> None:
    steps = args.warmup + args.steps
    total = steps + args.steps  # the profiled steps, then the same count again without the profiler
    rows = torch.randn(total * args.batch_size, args.d_in, generator=torch.Generator().manual_seed(0))
    marks: list[float] = []
    options = {"shuffle": False, "progress": False, "log_every": 10**9, "dead_tokens": args.dead_tokens,
               "warmup_steps": 0, "decay_fraction": 0.0,  # a constant lr, as make bench
               "norm_estimation_batches": 2, "geometric_median_rows": 4096,
               **{key: _value(value) for key, value in (o.split("=", 1) for o in args.option)}}
    trainer = sae.build_trainer(rows, arch=args.arch, n_features=n_features, k=k, batch_size=args.batch_size,
                                total_tokens=total * args.batch_size, seed=0, **options)
    trainer.initialize()
    batches = iter(trainer.stream.batches())
    for step in range(args.warmup):
        x, grads = next(batches)
        trainer.train_step(step, x, grads)
    gemm = gemm_seconds(args.batch_size, args.d_in, n_features)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(args.warmup, steps):
            x, grads = next(batches)
            began = time.perf_counter()
            trainer.train_step(step, x, grads)
            marks.append(time.perf_counter() - began)
    step_s = statistics.median(marks)
    # the profiler's bookkeeping slows the profiled steps a little; time the same steps again without it
    again = []
    for step in range(steps, steps + args.steps):
        x, grads = next(batches)
        began = time.perf_counter()
        trainer.train_step(step, x, grads)
        again.append(time.perf_counter() - began)
    plain = statistics.median(again)
    gemm_after = gemm_seconds(args.batch_size, args.d_in, n_features)
    gemm = min(gemm, gemm_after)
    flops = 2 * args.batch_size * args.d_in * n_features
    print(f"\n== {args.arch} F={n_features} k={k} B={args.batch_size} d={args.d_in}, {args.threads} threads ==")
    print(f"step {plain * 1e3:.1f} ms ({args.batch_size / plain:,.0f} tok/s; profiled {step_s * 1e3:.1f} ms); "
          f"encoder GEMM alone {gemm * 1e3:.1f} ms ({flops / gemm / 1e9:.0f} GFLOP/s, floor "
          f"{args.batch_size / gemm:,.0f} tok/s): {gemm / plain:.0%} of the one-GEMM floor")
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"{'op':44} {'self ms/step':>12} {'share':>6} {'calls/step':>10}")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]:
        per_step = event.self_cpu_time_total / 1e3 / args.steps
        print(f"{event.key[:44]:44} {per_step:12.2f} {event.self_cpu_time_total / total:6.1%} "
              f"{event.count / args.steps:10.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for shape in args.shapes.split(","):
        n_features, k = (int(v) for v in shape.lower().split("x"))
        profile_shape(args, n_features, k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
