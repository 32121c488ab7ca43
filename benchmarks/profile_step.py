"""Where a training step's time goes, against its one-GEMM floor (issue 11, item 8).

    .venv/bin/python benchmarks/profile_step.py                        # F=9216, k=32 and F=32768, k=64
    .venv/bin/python benchmarks/profile_step.py --shapes 9216x32 --steps 8 --top 25

For each shape (n_features x k) it trains our real Trainer (`sae.build_trainer`, sparse kernels, AuxK with dead
latents found after --dead-tokens) on Gaussian rows of width --d-in, times --steps steps after --warmup steps,
and reads torch.profiler's per-op self CPU time over those steps. In the same run it times the encoder's forward
GEMM alone ([B, d] @ [d, F] into a preallocated output, 2*B*d*F FLOPs): the one-GEMM floor, which no exact TopK
step can beat. Printed: tokens/s, the floor's tokens/s, our fraction of it, and the ops that cost the most.

The profiler's per-op self times are inflated by its own bookkeeping (a profiled step takes up to 1.5x a plain one,
and memory-bound ops over [F, d] tensors took 5-10x their standalone time under it), so the step is also split into
phases timed by the wall clock without the profiler (`Phases`: the trainer's collaborators wrapped by timers, the
step's code untouched): normalise, encoder GEMM, selection, aux loss, decode and loss, backward, decoder-gradient
projection, gradient norm, Adam, decoder renormalisation, latent counters. Each phase's mean per step is printed with
its share of the step and against the GEMM alone, and the step's time outside every phase last (the loop's own code
and the timers' cost).
Run it on a quiet machine (no other heavy job): the fraction is a ratio of times measured minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from bench_training import gemm_flops
from torch.profiler import ProfilerActivity, profile

import sae
import sae.training.trainer as trainer_module
from sae.training.trainer import Trainer


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
    parser.add_argument("--by-shape", action="store_true",
                        help="list ops per input shape (torch.profiler record_shapes): which copy_ or mul costs")
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


class Phases:
    """Wall-clock seconds per step phase, from timers wrapped around the trainer's collaborators (not the step's own
    code). A nested phase's time is subtracted from the phase around it: "encoder GEMM + gather" excludes
    "selection", and "decode + loss" excludes both and "aux loss (forward)"."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._inner: list[float] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._inner.append(0.0)
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - began
                inner = self._inner.pop()
                self.seconds[name].append(spent - inner)
                if self._inner:
                    self._inner[-1] += spent
        return timed

    @contextlib.contextmanager
    def installed(self, trainer: Trainer) -> Iterator[None]:
        """Wrap the step's collaborators for the duration of the block (instance and module attributes)."""
        model = trainer.sae
        patches = [(model, "normalize", "normalise"), (model, "encode_train_sparse", "encoder GEMM + gather"),
                   (model, "select_train", "selection"), (model, "observe", "counters + thresholds"),
                   (trainer, "losses", "decode + loss"), (trainer.optimizer, "step", "Adam"),
                   (trainer.tracker, "update", "counters + thresholds"),
                   (trainer_module, "sparse_aux_loss", "aux loss (forward)"),
                   (trainer_module, "project_decoder_grads", "decoder-gradient projection"),
                   (trainer_module, "clip_in_optimizer", "gradient norm"),
                   (trainer_module, "normalize_decoder_rows", "decoder renormalisation"),
                   (torch.Tensor, "backward", "backward (all losses)")]
        saved = [(owner, attr, owner.__dict__.get(attr)) for owner, attr, _ in patches]
        for owner, attr, name in patches:
            setattr(owner, attr, self.wrap(name, getattr(owner, attr)))
        try:
            yield
        finally:
            for owner, attr, old in saved:
                if old is None:
                    delattr(owner, attr)  # it was the class's method: drop the instance attribute
                else:
                    setattr(owner, attr, old)

    def report(self, step_s: float, gemm_s: float, steps: int) -> None:
        per_step = {name: sum(v) / steps for name, v in self.seconds.items()}
        covered = sum(per_step.values())
        print(f"{'phase (wall clock, no profiler)':44} {'ms/step':>12} {'share':>6} {'x GEMM':>7}")
        for name, seconds in sorted(per_step.items(), key=lambda item: -item[1]):
            print(f"{name:44} {seconds * 1e3:12.1f} {seconds / step_s:6.1%} {seconds / gemm_s:7.2f}")
        print(f"{'(step outside these phases)':44} {(step_s - covered) * 1e3:12.1f} {1 - covered / step_s:6.1%}")


def profile_shape(args: argparse.Namespace, n_features: int, k: int) -> None:
    steps = args.warmup + args.steps
    total = steps + 2 * args.steps  # the profiled steps, then as many without the profiler, then with phase timers
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
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
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
    phases, phased = Phases(), []
    with phases.installed(trainer):
        for step in range(steps + args.steps, steps + 2 * args.steps):
            x, grads = next(batches)
            began = time.perf_counter()
            trainer.train_step(step, x, grads)
            phased.append(time.perf_counter() - began)
    gemm_after = gemm_seconds(args.batch_size, args.d_in, n_features)
    gemm = min(gemm, gemm_after)
    flops = 2 * args.batch_size * args.d_in * n_features
    print(f"\n== {args.arch} F={n_features} k={k} B={args.batch_size} d={args.d_in}, {args.threads} threads ==")
    print(f"step {plain * 1e3:.1f} ms ({args.batch_size / plain:,.0f} tok/s; profiled {step_s * 1e3:.1f} ms); "
          f"encoder GEMM alone {gemm * 1e3:.1f} ms ({flops / gemm / 1e9:.0f} GFLOP/s, floor "
          f"{args.batch_size / gemm:,.0f} tok/s): {gemm / plain:.0%} of the one-GEMM floor")
    events = prof.key_averages(group_by_input_shape=args.by_shape)
    total = sum(e.self_cpu_time_total for e in events)
    header = f"{'op':44} {'self ms/step':>12} {'share':>6} {'calls/step':>10}"
    print(header + ("  input shapes" if args.by_shape else ""))
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        per_step = event.self_cpu_time_total / 1e3 / args.steps
        shapes = f"  {event.input_shapes}" if args.by_shape else ""
        print(f"{event.key[:44]:44} {per_step:12.2f} {event.self_cpu_time_total / total:6.1%} "
              f"{event.count / args.steps:10.1f}{shapes}")
    print()
    phases.report(sum(phased) / len(phased), gemm, args.steps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for shape in args.shapes.split(","):
        n_features, k = (int(v) for v in shape.lower().split("x"))
        profile_shape(args, n_features, k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
